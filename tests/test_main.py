"""The study through `distill_jax.main`: a tiny end-to-end run, resumability, preemption, bad configs."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import paper, toy
from distill_jax import main
from distill_jax.stages.evaluate import read_records

STAGE_OUTPUTS = [
    "data/tfrecords/toy_world.manifest.json", "tokenizer/tokenizer.json",
    "models/audio/config.json", "models/audio/model.safetensors", "models/visual/config.json",
    "eval/audio/analysis.jsonl", "eval/visual/test.jsonl", "eval/visual/unseen.jsonl", "eval/summary.json",
    "switch/metrics.json", "labels/visual-train.jsonl", "labels/audio-train.jsonl", "labels/learned.jsonl",
    "labels/always.jsonl", "distill/learned/adapter/adapter_config.json",
    "distill/learned/adapter/adapter_model.safetensors", "distill/always/logs/metrics.jsonl",
    "eval/student_learned/test.jsonl", "eval/student_always/unseen.jsonl",
    "results.md", "results.json", "per_class_accuracy.png", "modality_gap.png",
]


def _mtimes(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, workdir)
            if not rel.startswith(("jax_cache", "results", "timings", "config.json")) and not rel.endswith(".png"):
                out[rel] = os.stat(path).st_mtime_ns
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("study"))
    main.run(toy.get_config("tiny=1"), workdir)
    return workdir


def test_every_stage_writes_outputs_that_parse(tiny_run):
    for rel in STAGE_OUTPUTS:
        assert os.path.getsize(os.path.join(tiny_run, rel)) > 0, rel
    results = json.load(open(os.path.join(tiny_run, "results.json")))
    assert set(results["accuracy"]) == {"student (original)", "teacher", "student distilled (learned)",
                                        "student distilled (always)"}
    manifest = json.load(open(os.path.join(tiny_run, STAGE_OUTPUTS[0])))
    for split in ("test", "unseen"):
        records = read_records(os.path.join(tiny_run, "eval", "student_learned", f"{split}.jsonl"))
        assert len(records) == manifest["splits"][split]["num_examples"]  # every clip once
        assert all(len(r["letter_logits"]) == 20 for r in records)  # the toy's fixed 20-way questions
    labels = read_records(os.path.join(tiny_run, "labels", "always.jsonl"))
    assert len(labels) == manifest["splits"]["train"]["num_examples"] and all(r["switch_closed"] for r in labels)
    metrics = [json.loads(line) for line in open(os.path.join(tiny_run, "distill", "learned", "logs", "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1)) and np.isfinite(metrics[-1]["loss"])
    assert "## The study's checks (measured)" in open(os.path.join(tiny_run, "results.md")).read()
    assert json.load(open(os.path.join(tiny_run, "models", "audio", "config.json")))["model_type"] == "qwen2_audio"


def test_rerun_does_no_work_again(tiny_run, capsys):
    before = _mtimes(tiny_run)
    main.run(toy.get_config("tiny=1"), tiny_run)
    assert _mtimes(tiny_run) == before
    out = capsys.readouterr().out
    assert "distill: learned done" in out and "switch: " in out and "skipped" in out


def _distill_cmd(workdir, steps):
    return [sys.executable, "-m", "distill_jax.main", "--config", f"{os.path.dirname(toy.__file__)}/toy.py:tiny=1",
            f"--workdir={workdir}", "--stages=distill", f"--config.distill.max_steps={steps}",
            "--config.distill.checkpoint_every=3", "--config.distill.modes=('learned',)",
            "--config.distill.eval_splits=('test',)"]


def _copy_without_distill(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("distill", "student_*"))


def _order(workdir):
    order = {}
    for line in open(os.path.join(workdir, "distill", "learned", "batches.jsonl")):
        row = json.loads(line)
        order[row["step"]] = row["clip_ids"]  # a resumed run repeats the steps after its checkpoint
    return order


def test_killed_distill_resumes_to_the_same_weights(tiny_run, tmp_path):
    steps = 24
    env = {**os.environ, "XLA_FLAGS": ""}  # one device in the subprocesses
    interrupted, uninterrupted = str(tmp_path / "killed"), str(tmp_path / "straight")
    _copy_without_distill(tiny_run, interrupted)
    _copy_without_distill(tiny_run, uninterrupted)
    subprocess.run(_distill_cmd(uninterrupted, steps), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_distill_cmd(interrupted, steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(interrupted, "distill", "learned", "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if any(3 <= int(d) < steps for d in done):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert killed_at < steps and not os.path.exists(os.path.join(interrupted, "distill", "learned", "adapter"))

    subprocess.run(_distill_cmd(interrupted, steps), check=True, env=env, capture_output=True)
    a = load_file(os.path.join(interrupted, "distill", "learned", "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(uninterrupted, "distill", "learned", "adapter", "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=0, err_msg=key)
    assert _order(interrupted) == _order(uninterrupted) and len(_order(uninterrupted)) == steps
    for name in ("batches.jsonl", "logs/metrics.jsonl"):  # the repeated steps' lines are not doubled
        logged = [json.loads(line)["step"] for line in open(os.path.join(interrupted, "distill", "learned", name))]
        assert logged == sorted(set(logged)) and logged[-1] == steps, name


@pytest.mark.parametrize("edit,match", [
    (lambda c: None, "unknown stage"),
    (lambda c: setattr(c, "direction", "sideways"), "config.direction='sideways'"),
    (lambda c: setattr(c.distill, "modes", ("learned", "sometimes")), "config.distill.modes"),
    (lambda c: setattr(c.distill, "loss", "soft"), "config.distill.loss='soft'"),
    (lambda c: setattr(c.distill, "remat", "most"), "config.distill.remat='most'"),
    (lambda c: setattr(c.models, "attention_impl", "splash"), "config.models.attention_impl='splash'"),
])
def test_bad_config_values_are_named(edit, match, tmp_path):
    config = toy.get_config()
    edit(config)
    stages = ["prepare", "evaluatee"] if match == "unknown stage" else None
    with pytest.raises(main.ConfigError, match=match):
        main.run(config, str(tmp_path), stages)
    assert not os.listdir(tmp_path)  # refused before any work


def test_mesh_that_does_not_divide_the_devices_is_named(tmp_path):
    config = toy.get_config()
    config.mesh.fsdp = 3
    with pytest.raises(main.ConfigError, match=f"config.mesh=.* does not fit the {jax.device_count()} devices"):
        main.run(config, str(tmp_path))


def test_paper_config_needs_its_checkpoints(tmp_path):
    config = paper.get_config(f"audio={tmp_path}/nowhere,manifest={tmp_path}/m.json")
    with pytest.raises(main.ConfigError, match="config.models.audio.path=.*nowhere.* is not a checkpoint"):
        main.run(config, str(tmp_path / "w"))
    with pytest.raises(ValueError, match="mesh='8'"):
        paper.get_config("mesh=8")
    runs = []
    paper.sweep(lambda **kw: runs.append(kw))
    assert {"distill.modes": ("always",)} in runs and len(runs) == 5


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path):
    workdir = str(tmp_path / "nan")
    _copy_without_distill(tiny_run, workdir)
    config = toy.get_config("tiny=1")
    config.distill.modes = ("learned",)
    config.distill.checkpoint_every = 1
    config.distill.learning_rate = 1e38  # the first update sends the adapters to inf
    config.distill.warmup_steps = 0
    with pytest.raises(FloatingPointError, match=r"distill learned: loss (nan|inf) at step \d+; stopped without "
                                                 r"saving it\. The last good checkpoint is step \d+") as error:
        main.run(config, workdir, ["distill"])
    bad, good = (int(n) for n in re.findall(r"step (\d+)", str(error.value)))
    assert good == bad - 1 >= 1
    ckpts = os.listdir(os.path.join(workdir, "distill", "learned", "checkpoints"))
    assert max(int(d) for d in ckpts if d.isdigit()) == good
    assert not os.path.exists(os.path.join(workdir, "distill", "learned", "adapter"))


def test_audio_to_vl_direction(tiny_run, tmp_path):
    """The visual model as the student: switch, labels, distillation of Qwen2-VL (static grids)."""
    workdir = str(tmp_path / "a2v")
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("switch", "labels", "distill", "student_*",
                                                                     "results*"))
    config = toy.get_config("tiny=1,direction=audio_to_vl")
    config.distill.modes = ("always",)
    main.run(config, workdir, ["switch", "label", "distill", "report"])  # reuses the direction-free stages
    with pytest.raises(main.ConfigError, match="made with direction='audio_to_vl'"):
        main.run(toy.get_config("tiny=1"), workdir, ["report"])
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert (results["teacher"], results["student"]) == ("audio", "visual")
    adapter = json.load(open(os.path.join(workdir, "distill", "always", "adapter", "adapter_config.json")))
    assert "language_model" in adapter["target_modules"] and "visual" not in adapter["target_modules"]
    labels = read_records(os.path.join(workdir, "labels", "always.jsonl"))
    audio_train = {r["clip_id"]: r for r in read_records(os.path.join(workdir, "labels", "audio-train.jsonl"))}
    assert all(r["teacher_letter"] == audio_train[r["clip_id"]]["predicted"] for r in labels)
