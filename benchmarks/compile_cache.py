"""Compile time of the study's jitted programs: cold vs from the persistent compilation cache.

`distill_jax.main.run` calls `main.enable_compilation_cache(workdir)`: the cache lives in
<workdir>/jax_cache and every program is written (`jax_persistent_cache_min_compile_time_secs`
= 0). This benchmark calls the same function; `--min-compile-time=1` gives JAX's default, which
writes only programs whose XLA compile took at least 1 s.

Two programs the stages compile, on a random Qwen2-Audio loaded through `convert.load_hf` on
the toy config's mesh, inside `jax.set_mesh` as `main.run` runs the stages:
- score: `decoding.score_choices`, the evaluate / label step (the original model);
- train step: the trainer's step (`train.loop.make_step` on `train.step.distill_objective`) after
  `lora.apply_lora` + `init_state`, the distill step.
Inputs have the pipeline's shapes: a batch of clips with the transform's window of
`audio.window_frames(--seconds)` mel frames (1008 for 10 s) and prompts left-padded to a bucket
(`--prompt-len`).

Each run is a fresh Python process (in-memory caches do not count): "cold" starts with an
empty cache dir, "warm" reuses the one the cold run filled. Per program, "first call s" is
the first call (trace + lower + XLA compile or cache read + one run); "overhead s" is that
minus a steady-state call, the figure to compare. JAX's monitoring events split it into
trace + lower (never cached) and XLA compile (on a hit: reading the cache entry).

    python benchmarks/compile_cache.py                    # text 256 x 4 layers, audio 256 x 4, batch 8 x 10 s
    python benchmarks/compile_cache.py --min-compile-time=1     # JAX's default threshold

Prints a table and appends a JSON line to benchmarks/results.jsonl (not with --no-record).
"""
from __future__ import annotations

import time

_START = time.perf_counter()  # the child's process start, before the heavy imports

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import (add_language_model_args, append_result, language_model_config, machine, print_table,  # noqa: E402
                    versions)
from data_pipelines.audio import window_frames  # noqa: E402

EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "compile_s",
          "/jax/compilation_cache/cache_hits": "cache_hits",
          "/jax/compilation_cache/cache_misses": "cache_writes"}  # JAX records a "miss" when it writes an entry


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_language_model_args(p)
    p.add_argument("--tower-dim", type=int, default=256)
    p.add_argument("--tower-layers", type=int, default=4)
    p.add_argument("--tower-heads", type=int, default=4)
    p.add_argument("--tower-ffn", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--text-tokens", type=int, default=100, help="prompt tokens besides the audio ones")
    p.add_argument("--prompt-len", type=int, default=512, help="the padding bucket (paper config: 512 for 10 s)")
    p.add_argument("--min-compile-time", type=float, default=None,
                   help="jax_persistent_cache_min_compile_time_secs; default: main.py's (0; JAX's default: 1 s)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results.jsonl")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args()


# ------------------------------------------------------------------------------------------------
# The child: one fresh process, one cache dir.
# ------------------------------------------------------------------------------------------------

def make_batch(args, config):
    """Model inputs and distill targets with the pipeline's shapes (random values)."""
    from data_pipelines.audio import SAMPLE_RATE, num_audio_frames, num_audio_tokens

    rng = np.random.RandomState(0)
    frames = window_frames(args.seconds)  # the transform's short window (1008 frames for 10 s)
    real_frames = num_audio_frames(int(args.seconds * SAMPLE_RATE))
    audio_tokens = num_audio_tokens(real_frames)
    length = args.text_tokens + audio_tokens
    if length > args.prompt_len:
        raise ValueError(f"prompts of {length} tokens do not fit --prompt-len={args.prompt_len}")
    ids = np.zeros((args.batch, args.prompt_len), np.int32)
    mask = np.zeros_like(ids)
    ids[:, -length:] = rng.randint(20, config.text.vocab_size - 1, (args.batch, length))
    ids[:, -length + 20:-length + 20 + audio_tokens] = config.audio_token_index
    mask[:, -length:] = 1
    inputs = {"input_ids": ids, "attention_mask": mask,
              "input_features": rng.randn(args.batch, 128, frames).astype(np.float32),
              "feature_attention_mask": (np.arange(frames) < real_frames).astype(np.int32)[None].repeat(args.batch, 0)}
    targets = {"switch_closed": rng.rand(args.batch) < 0.5,
               "teacher_letter": rng.randint(0, 10, args.batch).astype(np.int32),
               "teacher_logits": rng.randn(args.batch, 10).astype(np.float32),
               "student_letter": rng.randint(0, 10, args.batch).astype(np.int32),
               "weight": np.ones(args.batch, np.float32)}
    return inputs, targets


def child(args):
    from distill_jax import sharding
    from distill_jax.convert import load_hf
    from distill_jax.decoding import score_choices
    from distill_jax.models import lora
    from distill_jax.train.loop import OptimizerConfig, init_state, make_optimizer, make_step, place
    from distill_jax.train.step import distill_objective

    from distill_jax.main import enable_compilation_cache

    enable_compilation_cache(os.path.dirname(args.cache_dir))  # what main.run sets: <workdir>/jax_cache
    if args.min_compile_time is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", args.min_compile_time)

    totals = collections.Counter()

    def on_duration(event, duration, **_):
        if event in EVENTS:
            totals[EVENTS[event]] += duration
            if event == "/jax/core/compile/backend_compile_duration":
                totals["compilations"] += 1

    def on_event(event, **_):
        if event in EVENTS:
            totals[EVENTS[event]] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)

    def measure(step):
        before = totals.copy()
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        first_done = time.perf_counter() - _START
        during = {k: totals[k] - before[k] for k in ("trace_s", "lower_s", "compile_s", "compilations",
                                                       "cache_hits", "cache_writes")}
        start = time.perf_counter()
        step()
        steady = time.perf_counter() - start
        return {"first_call_s": first, "steady_s": steady, "overhead_s": first - steady,
                "since_start_s": first_done, **during}

    letters = list(range(10, 20))
    results = {}
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})  # configs/toy.py's mesh
    with jax.set_mesh(mesh):
        model = load_hf(args.model_dir, mesh=mesh)
        inputs, targets = make_batch(args, model.config)
        results["score"] = measure(lambda: np.asarray(score_choices(model, inputs, letters)))

        lora.apply_lora(model, lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank), rngs=nnx.Rngs(100))
        sharding.shard_model(model, mesh)
        tx = make_optimizer(OptimizerConfig())
        graphdef, state, frozen = init_state(model, tx, mesh)
        train_step = make_step(graphdef, tx, distill_objective(letters, mode="labels"))
        targets = {k: v for k, v in targets.items() if k != "weight"}
        batch = place({**inputs, **targets, "valid": np.ones(args.batch, np.int32)}, mesh)
        holder = {"state": state}

        def step():
            holder["state"], metrics = train_step(holder["state"], frozen, batch)
            float(metrics["loss"])

        results["train step"] = measure(step)
    results["process"] = {k: totals[k] for k in ("trace_s", "lower_s", "compile_s", "compilations",
                                                  "cache_writes", "cache_hits")}
    print("RESULT " + json.dumps(results), flush=True)


# ------------------------------------------------------------------------------------------------
# The parent: builds the model once, runs the cold and the warm child.
# ------------------------------------------------------------------------------------------------

def save_model(args, path):
    from distill_jax.convert import save_hf
    from distill_jax.models.qwen2_audio import (Qwen2AudioConfig, Qwen2AudioEncoderConfig,
                                                Qwen2AudioForConditionalGeneration)

    config = Qwen2AudioConfig(
        audio=Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=args.tower_layers,
                                      encoder_attention_heads=args.tower_heads, encoder_ffn_dim=args.tower_ffn,
                                      d_model=args.tower_dim, max_source_positions=1500),
        text=language_model_config(args),
        audio_token_index=args.vocab - 1)
    save_hf(Qwen2AudioForConditionalGeneration(config, rngs=nnx.Rngs(0)), path)


def run_child(cache_dir, model_dir):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child",
                           f"--cache-dir={cache_dir}", f"--model-dir={model_dir}"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child process failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": wall}


def main():
    args = parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, cache_dir = os.path.join(tmp, "model"), os.path.join(tmp, "jax_cache")
        save_model(args, model_dir)
        runs = {"cold": run_child(cache_dir, model_dir)}
        files = [os.path.join(cache_dir, f) for f in os.listdir(cache_dir)] if os.path.isdir(cache_dir) else []
        cache = {"entries": len(files), "mb": sum(os.path.getsize(f) for f in files) / 2**20}
        runs["warm"] = run_child(cache_dir, model_dir)

    def tail(r):
        return (f"{r['trace_s'] + r['lower_s']:.2f}", f"{r['compile_s']:.2f}", r["compilations"], r["cache_writes"],
                r["cache_hits"])

    threshold = "0 s (main.py's)" if args.min_compile_time is None else f"{args.min_compile_time:g} s"
    print(f"Qwen2-Audio text {args.hidden} x {args.layers} layers, audio {args.tower_dim} x {args.tower_layers} "
          f"layers, LoRA rank {args.rank}; batch {args.batch} x {args.seconds:g} s ({window_frames(args.seconds)} "
          f"mel frames), prompts {args.prompt_len} tokens; cache min compile time {threshold}; "
          f"cache after the cold run: {cache['entries']} entries, {cache['mb']:.1f} MB")
    rows = [(program, run, f"{r['first_call_s']:.2f}", f"{r['steady_s']:.2f}", f"{r['overhead_s']:.2f}", *tail(r))
            for program in ("score", "train step") for run in ("cold", "warm") for r in [runs[run][program]]]
    print_table(rows, ("program", "run", "first call s", "steady s", "overhead s", "trace+lower s", "XLA compile s",
                       "compiles", "cache writes", "cache hits"))
    print()
    rows = [(run, f"{r['wall_s']:.2f}", f"{r['train step']['since_start_s']:.2f}", *tail(r["process"]))
            for run in ("cold", "warm") for r in [runs[run]]]
    print_table(rows, ("process", "wall s", "start to first train step done s", "trace+lower s", "XLA compile s",
                       "compiles", "cache writes", "cache hits"))
    cold, warm = runs["cold"], runs["warm"]
    print("cold / warm: " + ", ".join(f"{p} overhead {cold[p]['overhead_s'] / warm[p]['overhead_s']:.2f}x"
                                      for p in ("score", "train step"))
          + f", process wall {cold['wall_s'] / warm['wall_s']:.2f}x")
    if not args.no_record:
        config = {k: v for k, v in vars(args).items() if k not in ("no_record", "child", "cache_dir", "model_dir")}
        append_result({"benchmark": "compile_cache", "config": config, "machine": machine(),
                       "versions": versions("jax", "jaxlib", "flax"), "cache": cache, "runs": runs})


if __name__ == "__main__":
    main()
