"""The toy run's compile share: how much of `python -m distill_jax.main` is JAX tracing, lowering
and XLA compiling, with every model's layers scanned (config.models.scan_layers, the default)
and unrolled.

Each setting runs the whole default study (configs/toy.py, or --config-arg, e.g. `tiny=1`) in a
fresh process and a fresh workdir, so the persistent compilation cache starts empty. JAX's
monitoring events give the trace, lower and XLA-compile seconds, summed per stage; the stage's
wall time is main's own (timings.json). The two runs are otherwise the same study: their
results are compared in the table's last column (the switch's and the students' accuracy).

    python benchmarks/compile_share.py                    # the default toy run, both settings (~20 min)
    python benchmarks/compile_share.py --config-arg=tiny=1

Prints a table per setting and appends a JSON line per setting to benchmarks/results.jsonl
(not with --no-record).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import append_result, machine, print_table, versions  # noqa: E402

EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "compile_s"}


def child(args) -> None:
    """One study run in this process, its compile events summed per stage; JSON on the last line."""
    import jax

    from configs import toy
    from distill_jax import faults, main

    per_stage = collections.defaultdict(lambda: collections.defaultdict(float))

    def listen(event, duration, **_):
        if event in EVENTS:
            per_stage[faults._stage][EVENTS[event]] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    config = toy.get_config(args.config_arg)
    config.models.scan_layers = args.scan == "on"
    start = time.perf_counter()
    main.run(config, args.workdir)
    wall = time.perf_counter() - start
    timings = json.loads(open(os.path.join(main.seed_dir(args.workdir, config.seeds[0]), "timings.json")).read())
    results = json.loads(open(os.path.join(args.workdir, "results.json")).read())
    print(json.dumps({"wall_s": wall, "stages": timings, "compile": {k: dict(v) for k, v in per_stage.items()},
                      "results": _headline(results)}))


def _headline(results: dict) -> dict:
    """The figures two runs of the same study should share: each model's test accuracy, the switch's."""
    out = {name: round(100 * by_split["test"]["mean"], 2) for name, by_split in results["accuracy"].items()}
    out["switch (test)"] = round(100 * results["switch"]["accuracy"]["mean"], 2)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-arg", default="", help="configs/toy.py's argument, e.g. tiny=1")
    p.add_argument("--scan", action="append", choices=["on", "off"], help="repeatable; default: on and off")
    p.add_argument("--keep", help="a directory to keep each run's workdir in (scan_on/, scan_off/); default: temporary")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    runs = {}
    for scan in args.scan or ["on", "off"]:
        with tempfile.TemporaryDirectory() as temporary:
            workdir = os.path.join(args.keep or temporary, f"scan_{scan}")
            out = subprocess.run([sys.executable, __file__, "--child", f"--scan={scan}", f"--workdir={workdir}",
                                  f"--config-arg={args.config_arg}"], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the scan={scan} run failed:\n{out.stderr[-4000:]}")
        runs[scan] = json.loads(out.stdout.strip().splitlines()[-1])
        run = runs[scan]
        rows = []
        for stage, seconds in run["stages"].items():
            c = run["compile"].get(stage, {})
            spent = sum(c.get(k, 0.0) for k in EVENTS.values())
            rows.append((stage, f"{seconds:.1f}", f"{c.get('trace_s', 0):.1f}", f"{c.get('lower_s', 0):.1f}",
                         f"{c.get('compile_s', 0):.1f}", f"{100 * spent / seconds:.0f}%"))
        total = sum(sum(c.values()) for c in run["compile"].values())
        rows.append(("all", f"{run['wall_s']:.1f}", "", "", "", f"{100 * total / run['wall_s']:.0f}%"))
        print(f"\nscan_layers={scan} (toy config {args.config_arg or 'default'}): results {run['results']}")
        print_table(rows, ("stage", "wall s", "trace s", "lower s", "XLA compile s", "compile share"))
        if not args.no_record:
            append_result({"benchmark": "compile_share", "scan_layers": scan == "on",
                           "config_arg": args.config_arg, "machine": machine(),
                           "versions": versions("jax", "flax"), **run})


if __name__ == "__main__":
    main()
