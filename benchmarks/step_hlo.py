"""What XLA emits for the LoRA distill step (the one trainer's `train.loop.make_step`): does the
backward make transposed copies of the frozen weights every step?

Compiles the step of a small Qwen2 with LoRA (the distill objective, as in
benchmarks/lora_step.py) for this machine's backend and counts, in the optimized HLO, the
transpose and copy instructions (fused or not) whose shape is a frozen weight's or its
transpose, and the largest ones overall, by bytes per step.

    python benchmarks/step_hlo.py [--hidden=256 --layers=4 --seq=128 --batch=8]

Prints tables and appends a JSON line to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import (add_language_model_args, append_result, distill_batch, lora_student, machine,  # noqa: E402
                    print_table, versions)
from distill_jax import sharding  # noqa: E402
from distill_jax.train import loop  # noqa: E402
from distill_jax.train.step import distill_objective  # noqa: E402

INSTRUCTION = re.compile(r"(\w+)\[([\d,]*)\]\{[^}]*\} (transpose|copy|dot)\(")
ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "pred": 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_language_model_args(p)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    mesh = sharding.make_mesh({"fsdp": -1})
    model = lora_student(args, mesh)
    tx = loop.make_optimizer(loop.OptimizerConfig(total_steps=10, warmup_steps=1))
    graphdef, state, frozen = loop.init_state(model, tx, mesh)
    step = loop.make_step(graphdef, tx, distill_objective(list(range(10, 20))))
    b, t = args.batch, args.seq
    batch = distill_batch(b, t, args.vocab)
    with jax.set_mesh(mesh):
        text = step.lower(state, frozen, batch, ()).compile().as_text()

    weight_shapes = collections.Counter(tuple(v.shape) for v in jax.tree.leaves(frozen) if v.ndim == 2)
    weights = set(weight_shapes) | {s[::-1] for s in weight_shapes}
    counts, on_weights, sizes = collections.Counter(), collections.Counter(), collections.Counter()
    for match in INSTRUCTION.finditer(text):
        dtype, dims, op = match.groups()
        shape = tuple(int(x) for x in dims.split(",") if x)
        counts[op] += 1
        if op != "dot":
            sizes[(op, dtype, shape)] += 1
            if shape in weights:
                on_weights[(op, shape)] += 1
    print(f"LoRA distill step, Qwen2 {args.layers}x{args.hidden} (intermediate {args.intermediate}, vocab "
          f"{args.vocab}), batch {b} x {t}, {jax.devices()[0].platform}")
    print_table([(op, counts[op]) for op in ("dot", "transpose", "copy")], ("instruction", "count"))
    print()
    print_table([(str(shape), n, on_weights[("transpose", shape)] + on_weights[("copy", shape)])
                 for shape, n in weight_shapes.items()],
                ("frozen weight shape", "weights", "transposes + copies of it (or its transpose)"))
    print()
    largest = sorted(sizes.items(), key=lambda kv: -kv[1] * ITEMSIZE.get(kv[0][1], 4) * int(np.prod(kv[0][2])))[:8]
    print_table([(op, dtype, str(shape), n, f"{n * ITEMSIZE.get(dtype, 4) * int(np.prod(shape)) / 1e6:.1f}")
                 for (op, dtype, shape), n in largest], ("op", "dtype", "shape", "count", "MB per step"))
    append_result({"benchmark": "step_hlo", "args": vars(args), "machine": machine(), "versions": versions("jax"),
                   "counts": dict(counts), "on_frozen_weights": {f"{op} {shape}": n
                                                                 for (op, shape), n in on_weights.items()}})


if __name__ == "__main__":
    main()
