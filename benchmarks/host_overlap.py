"""Does the one trainer (`train.loop.train`) wait on the host? Step time with a slow input
pipeline vs a fast one.

The trainer dispatches step N asynchronously, then asks the iterator for batch N+1 while the
device computes, and fetches metrics only at log and checkpoint steps. So host work up to a
step's device time should cost nothing, and a Grain pipeline with prefetch threads should hide
more. This measures it: a LoRA distill step of a small Qwen2 (the distill objective, as in
benchmarks/lora_step.py) fed by

- `fast`: batches made ahead, no host work;
- `generator, H ms`: a plain Python iterator that spends H ms (sleeping, like I/O) per batch,
  with no prefetch: only asynchronous dispatch can hide it;
- `grain, H ms, k threads`: a Grain MapDataset whose per-example map spends H / batch ms,
  read with k threads and a prefetch buffer.

The step period is the time from the trainer's request for batch `--skip` (compile done) to the
end of training, per step. "hidden" = how much of the host time did not add to the fast
step: 1 - (period - fast) / H.

    python benchmarks/host_overlap.py [--steps=40] [--hidden=256 --layers=4 --seq=128 --batch=8]

Prints a table and appends a JSON line to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
import jax  # noqa: E402

from common import (add_language_model_args, append_result, distill_batch, distill_example, lora_student,  # noqa: E402
                    machine, print_table, versions)
from distill_jax import sharding  # noqa: E402
from distill_jax.train import loop  # noqa: E402
from distill_jax.train.step import distill_objective  # noqa: E402

LETTERS = list(range(10, 20))


class Timed:
    """An iterator that records when the trainer asks for each batch."""

    def __init__(self, batches):
        self.batches, self.asked = iter(batches), []

    def __iter__(self):
        return self

    def __next__(self):
        self.asked.append(time.perf_counter())
        return next(self.batches)


def period_ms(asked: list[float], done: float, skip: int) -> float:
    """Mean time per step from the trainer's request for batch `skip` to the end of training (the
    last step's metrics fetched, so every dispatched step has run): with asynchronous dispatch the
    requests alone run ahead of the device."""
    return 1000.0 * (done - asked[skip]) / (len(asked) - skip)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_language_model_args(p)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="first steps left out (compile, warm-up)")
    p.add_argument("--threads", type=int, default=4)
    args = p.parse_args()

    mesh = sharding.make_mesh({"fsdp": -1})
    loss_fn = distill_objective(LETTERS)
    batches_needed = args.steps + 1

    def run(batches) -> float:
        model = lora_student(args, mesh)
        timed = Timed(batches)
        with jax.set_mesh(mesh):
            loop.train(model, loss_fn, timed, optimizer=loop.OptimizerConfig(total_steps=args.steps, warmup_steps=1),
                       loop=loop.LoopConfig(steps=args.steps, log_every=args.steps), mesh=mesh, name="overlap")
        return period_ms(timed.asked, time.perf_counter(), args.skip)

    made = [distill_batch(args.batch, args.seq, args.vocab, first=b * args.batch) for b in range(batches_needed)]
    fast = run(made)

    def generator(host_ms: float):
        for batch in made:
            time.sleep(host_ms / 1000)
            yield batch

    def grain_pipeline(host_ms: float, threads: int):
        def slow_example(i):
            time.sleep(host_ms / 1000 / args.batch)
            return distill_example(int(i), args.seq, args.vocab)

        dataset = grain.MapDataset.range(batches_needed * args.batch).map(slow_example).batch(args.batch)
        return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)))

    rows, record = [("fast (made ahead)", 0, f"{fast:.1f}", "")], {"fast_ms": fast, "runs": []}
    for factor in (0.5, 1.0, 2.0):
        host_ms = factor * fast
        for name, batches in (("generator, no prefetch", generator(host_ms)),
                              (f"grain, {args.threads} threads", grain_pipeline(host_ms, args.threads))):
            period = run(batches)
            hidden = 1 - (period - fast) / host_ms
            rows.append((name, f"{host_ms:.1f}", f"{period:.1f}", f"{hidden:.0%}"))
            record["runs"].append({"pipeline": name, "host_ms": host_ms, "period_ms": period, "hidden": hidden})
    print(f"LoRA distill step of a Qwen2 {args.layers}x{args.hidden}, batch {args.batch} x {args.seq} tokens, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s); mean step period over steps "
          f"{args.skip + 1}-{args.steps}")
    print_table(rows, ("input pipeline", "host ms/batch", "step period ms", "host time hidden"))
    append_result({"benchmark": "host_overlap", "args": vars(args), "machine": machine(),
                   "versions": versions("jax", "grain"), **record})


if __name__ == "__main__":
    main()
