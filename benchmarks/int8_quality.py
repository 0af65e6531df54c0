"""Weight-only int8 (config.models.quantize="int8") against float, on a finished toy study's models.

Copies a toy workdir (e.g. the one `compile_share.py --keep` leaves, or `python -m distill_jax.main`'s),
drops its evaluate outputs, reruns the evaluate stage with every model's Linear kernels int8, and
compares each model's records clip by clip with the float run's: accuracy, the letter each picks
(agreement), and the largest change of a letter probability. The toy models are small (hidden 64-128),
so int8's relative rounding is larger than at 7B; the logit error of a random model is in
tests/test_quantize.py.

    python benchmarks/int8_quality.py --workdir=/tmp/cs/scan_on

Prints a table and appends a JSON line to benchmarks/results.jsonl (not with --no-record).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from common import append_result, machine, print_table, versions  # noqa: E402

EVALUATE_OUTPUTS = ("eval",)  # the evaluate stage's records and summary (students' too: not rerun)


def records(path: str) -> dict[str, dict]:
    with open(path) as f:
        return {r["clip_id"]: r for r in map(json.loads, f)}


def softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a finished toy run (its seed_0 is used)")
    p.add_argument("--config-arg", default="", help="the run's configs/toy.py argument")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    from configs import toy
    from distill_jax import main as study_main

    config = toy.get_config(args.config_arg)
    seed = config.seeds[0]
    source = study_main.seed_dir(args.workdir, seed)
    rows, record = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(args.workdir, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("distill", "labels", "switch", "jax_cache", "*.png"))
        seed_dir = study_main.seed_dir(tmp, seed)
        for rel in EVALUATE_OUTPUTS:
            shutil.rmtree(os.path.join(seed_dir, rel), ignore_errors=True)
        config.models.quantize = "int8"
        study_main.run(config, tmp, stages=["evaluate"])
        for model in sorted(os.listdir(os.path.join(seed_dir, "eval"))):
            folder = os.path.join(seed_dir, "eval", model)
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                split = name.removesuffix(".jsonl")
                ours, theirs = records(os.path.join(folder, name)), records(os.path.join(source, "eval", model, name))
                assert sorted(ours) == sorted(theirs), f"{model}/{name}: the two runs scored other clips"
                q = np.array([ours[c]["letter_logits"] for c in sorted(ours)])
                f = np.array([theirs[c]["letter_logits"] for c in sorted(ours)])
                answer = np.array([theirs[c]["answer"] for c in sorted(ours)])
                pick_q, pick_f = q.argmax(-1), f.argmax(-1)
                figures = {"clips": len(answer), "accuracy_float": float(np.mean(pick_f == answer)),
                           "accuracy_int8": float(np.mean(pick_q == answer)),
                           "agreement": float(np.mean(pick_q == pick_f)),
                           "max_probability_change": float(np.abs(softmax(q) - softmax(f)).max()),
                           "max_logit_change": float(np.abs(q - f).max())}
                record[f"{model}/{split}"] = figures
                rows.append((model, split, figures["clips"], f"{100 * figures['accuracy_float']:.1f}",
                             f"{100 * figures['accuracy_int8']:.1f}", f"{100 * figures['agreement']:.1f}",
                             f"{figures['max_probability_change']:.3f}", f"{figures['max_logit_change']:.3f}"))
    print_table(rows, ("model", "split", "clips", "float acc %", "int8 acc %", "same letter %",
                       "max |dp|", "max |dlogit|"))
    if not args.no_record:
        append_result({"benchmark": "int8_quality", "workdir": args.workdir, "machine": machine(),
                       "versions": versions("jax", "flax", "qwix"), "models": record})


if __name__ == "__main__":
    main()
