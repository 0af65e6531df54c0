"""The study on 2 processes x 2 CPU devices (jax.distributed, gloo collectives) equals the study
on 1 process x 4 devices: same results, records, labels and adapters; only process 0 wrote."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"{os.path.dirname(toy.__file__)}/toy.py:tiny=1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


MODES = ("learned", "always")  # two of the four switch modes: the same trainer, half the distill time


def _main(workdir, *flags):
    return [sys.executable, "-m", "distill_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--config.distill.modes={MODES!r}", *flags]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one = str(tmp_path_factory.mktemp("one_process"))
    two = str(tmp_path_factory.mktemp("two_processes"))
    port = _free_port()
    procs = [subprocess.Popen(_main(two, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                    f"--process_id={i}"), env=_env(2), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    # The reference runs alongside: the two processes wait on each other at every barrier.
    single = subprocess.Popen(_main(one), env=_env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    single_output = single.communicate(timeout=900)[0]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert single.returncode == 0, single_output[-4000:]
    return one, two, outputs


def _files(workdir):
    out = set()
    for root, _, names in os.walk(workdir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), workdir)
            if not rel.startswith("jax_cache"):
                out.add(rel)
    return out


def _without_timings(results):
    results = {k: v for k, v in results.items() if k != "timings_s"}
    return results


def test_two_processes_equal_one(runs):
    one, two, _ = runs
    a = json.load(open(os.path.join(one, "results.json")))
    b = json.load(open(os.path.join(two, "results.json")))
    assert _without_timings(a) == _without_timings(b)
    seed_one, seed_two = os.path.join(one, "seed_0"), os.path.join(two, "seed_0")
    records = sorted(f for f in _files(seed_one) if f.startswith(("eval/", "labels/")) and f.endswith(".jsonl"))
    assert "eval/student_learned/test.jsonl" in records and "labels/learned.jsonl" in records
    for rel in records:
        rows_a = [json.loads(line) for line in open(os.path.join(seed_one, rel))]
        rows_b = [json.loads(line) for line in open(os.path.join(seed_two, rel))]
        assert [r["clip_id"] for r in rows_a] == [r["clip_id"] for r in rows_b], rel  # the same clips, in order
        for key in ("predicted", "teacher_letter", "student_letter", "switch_closed"):
            assert [r.get(key) for r in rows_a] == [r.get(key) for r in rows_b], (rel, key)  # identical letters
        for key in ("letter_logits", "teacher_logits"):
            if key in rows_a[0]:
                np.testing.assert_allclose([r[key] for r in rows_a], [r[key] for r in rows_b], atol=1e-4,
                                           err_msg=f"{rel}: {key}")
    for mode in MODES:
        rel = os.path.join("distill", mode, "adapter", "adapter_model.safetensors")
        wa, wb = load_file(os.path.join(seed_one, rel)), load_file(os.path.join(seed_two, rel))
        assert sorted(wa) == sorted(wb)
        for key in wa:
            np.testing.assert_allclose(wa[key], wb[key], atol=1e-5, rtol=0, err_msg=f"{mode}: {key}")
    # The same global batches, in the same order: process 0's rows of each step are the first half of
    # the single process's rows (each host takes every other record of the step's slots).
    order = lambda root: [json.loads(line)["clip_ids"] for line in open(os.path.join(root, "distill", "learned",
                                                                                    "batches.jsonl"))]
    for step_one, step_two in zip(order(seed_one), order(seed_two)):
        assert set(step_two) <= set(step_one) and len(step_two) * 2 == len(step_one)


def test_only_process_0_wrote_and_nothing_is_left_half_done(runs):
    one, two, outputs = runs
    files_one, files_two = _files(one), _files(two)
    assert not [f for f in files_two if f.endswith(".tmp") or ".tmp" in os.path.basename(f) or ".parts-" in f]
    # Every file of the 2-process workdir is one the single process writes too: no per-host copies
    # of records, logs or adapters (orbax keeps one part per host inside its checkpoints).
    orbax = lambda f: "/checkpoints/" in f or f.startswith("seed_0/switch/model/state/")
    events = lambda f: os.path.dirname(f) if os.path.basename(f).startswith("events.out.tfevents") else f
    assert {events(f) for f in files_two if not orbax(f)} == {events(f) for f in files_one if not orbax(f)}
    assert len([f for f in files_two if "events.out.tfevents" in f]) == len(MODES)  # one writer per distill mode
    assert "== report" in outputs[0] and "report: " in outputs[0] and "report: " not in outputs[1]
