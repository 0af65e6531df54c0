"""Shared helpers for benchmarks: timing, the machine description, the results log."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")


def add_language_model_args(parser) -> None:
    """The small Qwen2 language model the CPU benchmarks share (sizes as flags)."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=4096)


def language_model_config(args, **overrides):
    """Our Qwen2Config of the sizes `add_language_model_args` defines."""
    from distill_jax.models.qwen2 import Qwen2Config

    return Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, **overrides)


def lora_student(args, mesh):
    """The distill step's student: that Qwen2 (tied embeddings), random, sharded on `mesh`, LoRA rank 8."""
    from flax import nnx

    from distill_jax import sharding
    from distill_jax.models import lora
    from distill_jax.models.qwen2 import Qwen2ForCausalLM

    config = language_model_config(args, tie_word_embeddings=True)
    model = sharding.create_sharded(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), mesh)
    lora.apply_lora(model, lora.LoraConfig(rank=8), rngs=nnx.Rngs(1))
    return model


def distill_example(i: int, seq: int, vocab: int) -> dict:
    """One random prompt with the fields the distill objective reads, seeded by its number `i`."""
    rng = np.random.default_rng(i)
    return {"input_ids": rng.integers(20, vocab, seq).astype(np.int32), "attention_mask": np.ones(seq, np.int32),
            "switch_closed": np.int32(i % 2), "teacher_letter": np.int32(i % 10),
            "student_letter": np.int32((i + 3) % 10), "teacher_logits": np.zeros(10, np.float32),
            "valid": np.int32(1)}


def distill_batch(size: int, seq: int, vocab: int, first: int = 0) -> dict:
    """Examples `first` .. `first + size - 1` (`distill_example`), stacked into a host batch."""
    examples = [distill_example(i, seq, vocab) for i in range(first, first + size)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def time_steps(step, *, warmup: int, steps: int) -> list[float]:
    """Wall-clock seconds of each of `steps` calls of `step()` after `warmup` calls.

    `step` must block until its work is done (block_until_ready / torch sync).
    """
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def machine() -> dict:
    import jax

    devices = jax.devices()
    return {
        "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "jax_backend": devices[0].platform, "jax_devices": len(devices),
        "device_kind": devices[0].device_kind,
    }


def versions(*modules: str) -> dict:
    import importlib

    out = {}
    for name in modules:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out


def append_result(record: dict) -> None:
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **record}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")


def print_table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = " | ".join(str(h).ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))
