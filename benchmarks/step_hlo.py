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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import add_language_model_args, append_result, machine, print_table, versions  # noqa: E402
from distill_jax import sharding  # noqa: E402
from distill_jax.models import lora  # noqa: E402
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
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
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=True)
    mesh = sharding.make_mesh({"fsdp": -1})
    model = sharding.create_sharded(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), mesh)
    lora.apply_lora(model, lora.LoraConfig(rank=8), rngs=nnx.Rngs(1))
    tx = loop.make_optimizer(loop.OptimizerConfig(total_steps=10, warmup_steps=1))
    graphdef, state, frozen = loop.init_state(model, tx, mesh)
    step = loop.make_step(graphdef, tx, distill_objective(list(range(10, 20))))
    b, t = args.batch, args.seq
    batch = {"input_ids": jnp.ones((b, t), jnp.int32), "attention_mask": jnp.ones((b, t), jnp.int32),
             "switch_closed": jnp.zeros(b, jnp.int32), "teacher_letter": jnp.zeros(b, jnp.int32),
             "student_letter": jnp.zeros(b, jnp.int32), "teacher_logits": jnp.zeros((b, 10)),
             "valid": jnp.ones(b, jnp.int32)}
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
