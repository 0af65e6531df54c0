"""Qwen2-Audio tower on a 10 s clip: the 30 s padded window (3000 mel frames) vs the short window.

FLOPs are XLA's count for the compiled program of the full 7B tower (32 layers,
d_model 1280; compiled, never run). Time is measured on this machine for a tower of
the 7B width with --layers layers (the full tower is minutes per clip on a CPU).

    python benchmarks/audio_tower.py                 # 10 s clip, 4 timed layers
    python benchmarks/audio_tower.py --seconds=5 --layers=32

Prints a table and appends a JSON line to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import append_result, machine, median_ms, print_table, time_steps, versions  # noqa: E402
from data_pipelines.audio import MAX_FRAMES, num_audio_frames  # noqa: E402
from distill_jax.models.qwen2_audio import Qwen2AudioConfig, Qwen2AudioEncoder, short_clip_frames  # noqa: E402


def jit_encoder(graphdef):
    @jax.jit
    def encode(state, features, mask):
        return nnx.merge(graphdef, state)(features, mask)

    return encode


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--layers", type=int, default=4, help="tower layers in the timed model")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    real = num_audio_frames(int(args.seconds * 16000))
    mask = np.zeros((1, MAX_FRAMES), np.int32)
    mask[0, :real] = 1
    short = short_clip_frames(mask)
    full_config = Qwen2AudioConfig.preset("7b").audio

    def flops(config, frames):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2AudioEncoder(config, rngs=nnx.Rngs(0))))
        encode = jit_encoder(graphdef)
        features = jax.ShapeDtypeStruct((1, config.num_mel_bins, frames), jnp.float32)
        masks = jax.ShapeDtypeStruct((1, frames), jnp.int32)
        cost = encode.lower(state, features, masks).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    timed_config = dataclasses.replace(full_config, encoder_layers=args.layers)
    model = Qwen2AudioEncoder(timed_config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    encode = jit_encoder(graphdef)

    rng = np.random.RandomState(0)
    features = jnp.asarray(rng.randn(1, 128, MAX_FRAMES).astype(np.float32))
    results = {}
    for name, frames in (("padded 30 s", MAX_FRAMES), ("short window", short)):
        f, m = features[..., :frames], jnp.asarray(mask[:, :frames])
        ms = median_ms(time_steps(lambda: encode(state, f, m).block_until_ready(), warmup=1, steps=args.steps))
        results[name] = dict(frames=frames, tflops_7b=flops(full_config, frames) / 1e12, ms=ms)
    padded, shortr = results["padded 30 s"], results["short window"]
    rows = [(name, r["frames"], f"{r['tflops_7b']:.3f}", f"{r['ms']:.0f}") for name, r in results.items()]
    print(f"Qwen2-Audio tower, one {args.seconds:g} s clip ({real} real mel frames); "
          f"time: 7B width with {args.layers} layers on {jax.devices()[0].platform}")
    print_table(rows, ("window", "mel frames", "7B tower TFLOPs", f"{args.layers}-layer time ms"))
    print(f"FLOPs ratio padded/short: {padded['tflops_7b'] / shortr['tflops_7b']:.2f}x, "
          f"time ratio: {padded['ms'] / shortr['ms']:.2f}x")
    append_result({"benchmark": "audio_tower", "config": vars(args), "machine": machine(),
                   "versions": versions("jax", "flax"), "results": results})


if __name__ == "__main__":
    main()
