"""The paper-scale programs compiled for TPU slices on a machine without a TPU (libtpu's compiler).

For each topology (v5e-8, v4-8, v5p-8) and its preset in `configs/paper.py`, lowers and compiles
the Qwen2-Audio-7B LoRA distill step, the Qwen2-VL-7B teacher scoring step and the Qwen2.5-Omni-7B
scoring step on sounded video (10 s clips: 1008 mel frames; video padded per clip as the pipeline
pads it, at the largest bucket pair of configs/paper.py: 10 temporal patches of 3072 patches, a frame
at the video processor's max_pixels, 7680 video tokens), then prints per-chip memory against the chip's HBM, XLA's FLOPs per chip per
step, and the MFU the step would have at --step-seconds (and the step time 50 % MFU needs).
XLA's FLOPs include what remat recomputes, so this MFU is a hardware-FLOPs utilisation.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # libtpu only
    JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py
    JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py --topology=v5e-8 --program=distill --remat=none

--batch/--remat/--mesh/--attention override the preset (to find the limits); `--scan=on --scan=off`
compiles each program with its layers scanned (the default) and unrolled, for the compile-time
ratio. An unrolled 7B compile takes minutes on 2 CPU cores. Prints a table and appends a JSON
line per program to results.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import append_result, machine, print_table, versions  # noqa: E402
from configs import paper  # noqa: E402
from distill_jax import aot  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", action="append", choices=sorted(aot.TOPOLOGIES),
                   help="repeatable; default: all")
    p.add_argument("--program", action="append", choices=sorted(aot.PROGRAMS), help="repeatable; default: all")
    p.add_argument("--batch", type=int, help="global batch (default: the preset's)")
    p.add_argument("--remat", choices=["none", "dots", "full"])
    p.add_argument("--mesh", help="DATAxFSDPxTENSOR, e.g. 1x8x1")
    p.add_argument("--attention", choices=["xla", "flash"])
    p.add_argument("--vision-chunk", type=int, help="the vision towers' query chunk (default: the preset's)")
    p.add_argument("--quantize", choices=["none", "int8"], help="the frozen weights (default: the preset's)")
    p.add_argument("--scan", choices=["on", "off"], action="append",
                   help="the models' layers scanned (on, the default) or unrolled; repeatable: both in one run")
    p.add_argument("--step-seconds", type=float, default=1.0, help="step time for the MFU column")
    p.add_argument("--no-record", action="store_true", help="do not append to results.jsonl")
    args = p.parse_args()
    if not aot.libtpu_available():
        sys.exit("libtpu is not installed (or does not match this jax): pip install \"jax[tpu]==<jax version>\"")

    rows = []
    for name in args.topology or sorted(aot.TOPOLOGIES):
        topology = aot.TOPOLOGIES[name]
        workloads = aot.workloads(paper.get_config(f"topology={name}"))
        for program, scan in [(p, s) for p in args.program or sorted(aot.PROGRAMS) for s in args.scan or ["on"]]:
            workload = workloads[program]
            overrides = {k: v for k, v in dict(batch_size=args.batch, remat=args.remat, attention_impl=args.attention,
                                               vision_query_chunk=args.vision_chunk).items() if v is not None}
            if args.mesh:
                overrides["mesh"] = tuple(int(x) for x in args.mesh.split("x"))
            if args.quantize:
                overrides["quantize"] = None if args.quantize == "none" else args.quantize
            workload = dataclasses.replace(workload, **overrides, scan_layers=scan == "on")
            result = aot.PROGRAMS[program](topology, workload)
            gib = lambda b: f"{b / aot.GIB:.2f}"  # noqa: E731
            mfu = result.mfu(args.step_seconds)
            rows.append((name, program, scan, workload.quantize or "bf16", "x".join(map(str, workload.mesh)),
                         workload.batch_size,
                         workload.prompt_length, workload.remat if program == "distill" else "-",
                         workload.attention_impl or "auto",
                         workload.vision_query_chunk if program != "distill" and workload.vision_query_chunk else "-",
                         gib(result.argument_bytes), gib(result.temp_bytes),
                         gib(result.output_bytes - result.alias_bytes), gib(result.peak_bytes),
                         f"{topology.hbm_gib:g}", "yes" if result.fits else "NO", f"{result.flops / 1e12:.1f}",
                         f"{result.model_flops / 1e12:.1f}", f"{100 * mfu:.0f}%",
                         f"{result.model_flops / (0.5 * topology.peak_tflops * 1e12):.2f}",
                         f"{result.compile_s:.0f}"))
            print(" | ".join(map(str, rows[-1])), flush=True)
            if not args.no_record:
                append_result({"benchmark": "tpu_aot", "topology": name, "program": result.program,
                               "workload": dataclasses.asdict(workload), "machine": machine(),
                               "versions": versions("jax", "flax", "libtpu"),
                               "argument_bytes": result.argument_bytes, "temp_bytes": result.temp_bytes,
                               "output_bytes": result.output_bytes, "alias_bytes": result.alias_bytes,
                               "peak_bytes": result.peak_bytes, "hbm_bytes": topology.hbm_gib * aot.GIB,
                               "fits": result.fits, "flops_per_chip": result.flops,
                               "model_flops_per_chip": result.model_flops, "compile_s": result.compile_s})
    print()
    print_table(rows, ("topology", "program", "scan", "weights", "mesh", "batch", "tokens", "remat", "attention",
                       "vision chunk", "args GiB",
                       "temps GiB", "outputs GiB", "peak GiB", "HBM GiB", "fits", "XLA TFLOP/chip", "model TFLOP/chip",
                       f"MFU @ {args.step_seconds:g} s", "s @ 50% MFU", "compile s"))


if __name__ == "__main__":
    main()
