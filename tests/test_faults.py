"""Nothing lost: a workdir lock against concurrent runs, directories written whole, data errors in
a study, and the tiny study killed (SIGKILL) at seeded random points of every stage, then rerun
to the results and adapters of an uninterrupted run."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import toy
from distill_jax import lock, main, multihost

HOLD = ("import sys, time\nfrom distill_jax.lock import WorkdirLock\nWorkdirLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\ntime.sleep(120)\n")


def test_a_second_run_on_a_workdir_in_use_is_refused_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.WorkdirBusyError, match=rf"workdir {tmp_path} is in use by pid {holder.pid} on host "
                                                        rf"{socket.gethostname()} \(since .*lock file .*\.lock\)"):
            main.run(toy.get_config("tiny=1"), str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == [".lock"]  # refused before any work
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    taken = lock.WorkdirLock(tmp_path)
    taken.acquire()  # the holder died without releasing: taken over, with a note
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(lock.WorkdirBusyError, match=f"in use by pid {os.getpid()}"):
        lock.WorkdirLock(tmp_path).acquire()  # a live holder (this process) is never taken over
    taken.release()
    assert not (tmp_path / ".lock").exists()


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    with multihost.atomic_dir(target, last="b.txt") as d:
        open(os.path.join(d, "a.txt"), "w").write("1")
        open(os.path.join(d, "b.txt"), "w").write("1")
    with pytest.raises(RuntimeError, match="boom"):
        with multihost.atomic_dir(target, last="b.txt") as d:
            open(os.path.join(d, "a.txt"), "w").write("2")
            raise RuntimeError("boom")  # a failure half way: the old directory stays
    assert sorted(os.listdir(target)) == ["a.txt", "b.txt"] and (target / "a.txt").read_text() == "1"
    with pytest.raises(FileNotFoundError, match="b.txt was not written"):
        with multihost.atomic_dir(target, last="b.txt") as d:
            open(os.path.join(d, "a.txt"), "w").write("3")
    with multihost.atomic_dir(target, last="b.txt") as d:
        open(os.path.join(d, "b.txt"), "w").write("4")
    assert sorted(os.listdir(target)) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["adapter"]  # no leftovers


# The stages' kill points, as the uninterrupted run met them; each kill is drawn from a stage the
# previous kills' reruns have not reached, so its count there is the uninterrupted run's.
ORDER = ("prepare", "warm_start", "evaluate", "switch", "label", "distill", "report")
FORCED = {"evaluate": "score_batch", "distill": "checkpoint_write"}  # mid-scoring part, mid-checkpoint write


def draw_kills(points: list[str], seed: int) -> list[str]:
    """One seeded random kill per stage ("<stage>/<point>/<n>", n within the uninterrupted run's
    count), and a second one in distill at the export of the next adapter (mid-export)."""
    rng = random.Random(seed)
    counts = {}
    for p in points:
        counts[p] = counts.get(p, 0) + 1
    kills = []
    for stage in ORDER:
        names = sorted(p.split("/")[1] for p in counts if p.startswith(stage + "/"))
        name = FORCED.get(stage) or rng.choice(names)
        kills.append(f"{stage}/{name}/{rng.randint(1, counts[f'{stage}/{name}'])}")
        if stage == "distill":
            kills.append("distill/dir/1")  # the rerun's first adapter export (the killed mode's)
    return kills


def _tiny_study(workdir, kill=None):
    """The tiny study in a fresh process (killed at `kill`) -> (return code, its output). Its
    output goes to a file and its process group is killed after it, so no orphan can hold us."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}  # as this test session (conftest)
    env.pop("DISTILL_JAX_FAULT_LOG", None)
    if kill:
        env["DISTILL_JAX_KILL"] = kill
    log = f"{workdir}.{(kill or 'final').replace('/', '-')}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distill_jax.main", "--config",
                                 f"{os.path.dirname(toy.__file__)}/toy.py:tiny=1", f"--workdir={workdir}"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=os.path.dirname(os.path.dirname(toy.__file__)))
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return code, open(log).read()


def _without_timings(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "timings_s"}


def test_killed_at_random_points_of_every_stage_the_study_resumes_to_the_uninterrupted_results(tiny_run, tmp_path):
    points = open(tiny_run + ".points").read().split()
    kills = draw_kills(points, seed=0)
    assert len(kills) == 8 and {"label", "report"} <= {k.split("/")[0] for k in kills}
    workdir = tmp_path / "killed"
    shutil.copytree(os.path.join(tiny_run, "jax_cache"), workdir / "jax_cache")  # programs compiled once per session
    for kill in kills:
        code, out = _tiny_study(workdir, kill)
        assert code == -signal.SIGKILL, (kill, code, out[-3000:])  # killed where it was told
    code, out = _tiny_study(workdir)
    assert code == 0, out[-3000:]
    assert "taking over the lock of pid" in out  # the last kill left its lock behind

    same = lambda rel: json.load(open(os.path.join(tiny_run, rel)))
    got = lambda rel: json.load(open(workdir / rel))
    assert _without_timings(got("results.json")) == _without_timings(same("results.json"))
    assert got("seed_0/results.json") == same("seed_0/results.json")
    for mode in toy.get_config("tiny=1").distill.modes:
        adapter = f"seed_0/distill/{mode}/adapter/adapter_model.safetensors"
        a, b = load_file(workdir / adapter), load_file(os.path.join(tiny_run, adapter))
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{mode} {key}")
        for log in ("batches.jsonl", "logs/metrics.jsonl"):  # the repeated steps' lines are not doubled
            steps = [json.loads(line)["step"] for line in open(workdir / f"seed_0/distill/{mode}/{log}")]
            assert steps == list(range(1, len(steps) + 1)), (mode, log)
        assert open(workdir / f"seed_0/distill/{mode}/batches.jsonl").read() == \
            open(os.path.join(tiny_run, f"seed_0/distill/{mode}/batches.jsonl")).read()
    leftovers = [os.path.join(r, n) for r, ds, fs in os.walk(workdir) for n in ds + fs
                 if n.endswith((".tmp", ".old")) or ".parts-" in n]
    assert not leftovers, leftovers


def test_skip_mode_logs_counts_and_reports_a_corrupt_record_and_stops_past_the_fraction(tiny_run, tmp_path):
    """A flipped byte in one test-split record, on_error="skip": evaluation scores every other clip,
    the record is in data_errors.jsonl (file, offset, clip id, reason) once, and in the report;
    with max_error_fraction below 1/clips the run stops naming the split and the log."""
    from data_pipelines import tfrecord

    workdir = tmp_path / "skip"
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("test.jsonl", "jax_cache"))
    manifest = json.load(open(workdir / "seed_0/data/tfrecords/toy_world.manifest.json"))
    shard = workdir / "seed_0/data/tfrecords" / manifest["splits"]["test"]["files"][0]
    offsets, lengths, _ = tfrecord.read_index(shard)
    bad_id = tfrecord.example_to_clip(tfrecord.TFRecordDataSource(shard).read(2)).clip_id
    with open(shard, "r+b") as f:
        f.seek(int(offsets[2] + lengths[2] // 2))
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    config = toy.get_config("tiny=1")
    config.data.on_error = "skip"
    main.run(config, str(workdir), ["evaluate", "report"])
    (entry,) = [json.loads(line) for line in open(workdir / "data_errors.jsonl")]
    assert entry["split"] == "test" and entry["path"] == str(shard) and entry["offset"] == offsets[2] - 12
    assert entry["reason"].startswith("data CRC mismatch") and entry["seed"] == 0
    records = [json.loads(line) for line in open(workdir / "seed_0/eval/audio/test.jsonl")]
    clips = manifest["splits"]["test"]["num_examples"]
    assert len(records) == clips - 1 and bad_id not in {r["clip_id"] for r in records}
    results = json.load(open(workdir / "results.json"))
    assert results["data_errors"]["skipped"] == [{"seed": 0, "split": "test", "skipped": 1, "of": clips,
                                                  "reasons": {"data CRC mismatch": 1}}]
    assert "## Data errors" in (workdir / "results.md").read_text()

    (workdir / "seed_0/eval/visual/test.jsonl").unlink()
    config.data.max_error_fraction = 0.5 / clips
    from distill_jax.data_errors import DataError
    with pytest.raises(DataError, match=rf"split 'test': 1 unreadable records of its {clips}, over "
                                        rf"config.data.max_error_fraction=.*data_errors.jsonl"):
        main.run(config, str(workdir), ["evaluate"])

    # A shard cut short: its lost tail is counted in records, from the converter's sidecar.
    for name in ("audio", "visual"):
        (workdir / f"seed_0/eval/{name}/test.jsonl").unlink(missing_ok=True)
    (workdir / "data_errors.jsonl").unlink()
    with open(shard, "r+b") as f:
        f.truncate(int(offsets[-5]) + 100)  # inside the fifth-last record
    config.data.max_error_fraction = 0.1
    main.run(config, str(workdir), ["evaluate", "report"])
    entries = [json.loads(line) for line in open(workdir / "data_errors.jsonl")]
    assert sorted((e["offset"], e.get("records")) for e in entries) == [(int(offsets[2]) - 12, None),
                                                                         (int(offsets[-5]) - 12, 5)]
    (cut,) = [e for e in entries if e.get("records")]
    assert "truncated" in cut["reason"] and "the rest of the file" in cut["reason"]
    assert json.load(open(workdir / "results.json"))["data_errors"]["skipped"][0]["skipped"] == 6
    records = [json.loads(line) for line in open(workdir / "seed_0/eval/audio/test.jsonl")]
    assert len(records) == clips - 6


def test_a_partial_last_log_line_is_dropped_with_a_warning(tmp_path, capsys):
    """A run killed while appending to a JSONL log leaves half a line: the resumed run drops it
    (and the steps after its checkpoint), naming the file; a bad line elsewhere is an error."""
    from distill_jax.train.loop import _truncate_log

    log = tmp_path / "batches.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "clip_')
    _truncate_log(multihost.path(log), 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert f"warning: {log}: dropped a partial last line" in capsys.readouterr().out
    log.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{log}: line 2 is not JSON"):
        _truncate_log(multihost.path(log), 2)


def test_a_torn_config_json_does_not_lock_the_workdir_out(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"direction": "vl_to_au')
    main.check_workdir(toy.get_config("tiny=1"), multihost.path(tmp_path))
    assert "config.json is not readable JSON" in capsys.readouterr().out


def test_leftovers_of_interrupted_writes_are_removed(tmp_path, capsys):
    (tmp_path / "a" / ".adapter.1a2b.old" / "sub").mkdir(parents=True)
    (tmp_path / "a" / ".adapter.1a2b.old" / "sub" / "x").write_text("")
    (tmp_path / "a" / ".labels.jsonl.3c4d.tmp").write_text("half")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "kept.jsonl").write_text("")
    main.remove_leftovers(multihost.path(tmp_path))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "b", "b/kept.jsonl"]
    assert "removed 2 temporary file(s)" in capsys.readouterr().out
