"""Cnn14 inference throughput on 10 s clips: our jitted Cnn14 vs panns-inference's PyTorch Cnn14
(eager, torch.no_grad, eval mode), same weights, same machine, same run.

Ours is loaded from the PyTorch model's saved state dict through `load_pann`, and the two
outputs are compared before timing (max |diff| is printed) so both sides compute the same thing.

    python benchmarks/cnn14.py                          # cnn14_32k, batch 2, 3 timed steps (~1.5 min on 2 cores)
    python benchmarks/cnn14.py --preset=cnn14_16k --batch=8

Prints a table and appends a JSON line to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from panns_reference import panns_models  # noqa: E402
from common import append_result, machine, median_ms, print_table, time_steps, versions  # noqa: E402
from distill_jax.convert import load_pann  # noqa: E402
from distill_jax.models.cnn14 import Cnn14Config  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cnn14_32k", choices=["cnn14_32k", "cnn14_16k"])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    return p.parse_args()


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, waveform):
    return nnx.merge(graphdef, state)(waveform)


def main():
    args = parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    config = Cnn14Config.preset(args.preset)
    torch.manual_seed(0)
    ref = panns_models().Cnn14(sample_rate=config.sample_rate, window_size=config.window_size,
                               hop_size=config.hop_size, mel_bins=config.mel_bins, fmin=config.fmin,
                               fmax=config.fmax, classes_num=config.classes_num).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cnn14.pth")
        torch.save({"model": ref.state_dict()}, path)
        ours = load_pann(path, config)
    graphdef, state = nnx.split(ours)
    n = int(round(args.seconds * config.sample_rate))
    wave = (0.1 * np.random.RandomState(0).randn(args.batch, n)).astype(np.float32)
    wave_t = torch.tensor(wave)

    start = time.perf_counter()
    got = jax.block_until_ready(_forward(graphdef, state, wave))
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        want = ref(wave_t)
    diff = max(float(np.abs(np.asarray(got[k]) - want[k].numpy()).max()) for k in ("clipwise_output", "embedding"))

    def ours_step():
        jax.block_until_ready(_forward(graphdef, state, wave))

    def torch_step():
        with torch.no_grad():
            ref(wave_t)

    ours_ms = median_ms(time_steps(ours_step, warmup=args.warmup, steps=args.steps))
    torch_ms = median_ms(time_steps(torch_step, warmup=args.warmup, steps=args.steps))
    ours_cps, torch_cps = args.batch / ours_ms * 1000, args.batch / torch_ms * 1000
    params = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    print(f"Cnn14 {args.preset} ({params / 1e6:.1f}M parameters), batch {args.batch} x {args.seconds:g} s clips; "
          f"outputs max |ours - panns| {diff:.1e}")
    print_table([("distill_jax (jit)", f"{ours_ms:.0f}", f"{ours_cps:.2f}", f"{compile_s:.1f}"),
                 ("panns PyTorch (eager)", f"{torch_ms:.0f}", f"{torch_cps:.2f}", "-")],
                ("implementation", "median batch ms", "clips/s", "first call s"))
    print(f"ratio (ours / panns clips/s): {ours_cps / torch_cps:.2f}x")
    append_result({"benchmark": "cnn14", "config": vars(args), "machine": machine(),
                   "versions": versions("jax", "flax", "torch"), "ours_ms": ours_ms, "panns_ms": torch_ms,
                   "ours_clips_per_s": ours_cps, "panns_clips_per_s": torch_cps, "ratio": ours_cps / torch_cps,
                   "compile_s": compile_s, "max_abs_diff": diff})


if __name__ == "__main__":
    main()
