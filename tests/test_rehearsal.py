"""configs/paper.py end to end on a VGGSound-shaped stand-in, as the README's rehearsal command runs it:
prepare (the VGGSound converter), evaluate, switch (from the PANN .pth), label, distill, report, with
on_error="skip", Grain workers, bfloat16, shuffled 10-way questions over real class names, the real
Qwen2 tokenizer, 30 s audio chunks and clips of mixed shapes and lengths; then the evaluate stage on
2 processes x 2 devices, whose records equal the single process's (the hosts agree on every batch's
shape while each holds different clips)."""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import related_classes, standin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _main(workdir, config, *flags):
    return [sys.executable, "-m", "distill_jax.main", f"--config={ROOT}/configs/paper.py:{config}",
            f"--workdir={workdir}", *flags]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("standin")
    return str(out), standin.build(out, seed=3, train_per_class=2, test_per_class=1)


@pytest.fixture(scope="module")
def rehearsal(made, tmp_path_factory):
    directory, _ = made
    workdir = str(tmp_path_factory.mktemp("rehearsal"))
    run = subprocess.run(_main(workdir, f"standin={directory}"), env=_env(4), cwd=ROOT, capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return workdir, run.stdout


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_the_paper_config_runs_every_stage_on_the_standin(made, rehearsal):
    directory, plan = made
    workdir, stdout = rehearsal
    for stage in ("prepare", "evaluate", "switch", "label", "distill"):
        assert re.search(rf"== {stage} done in [\d.]+ s \(\d+ XLA compiles, [\d.]+ s of it compiling\)", stdout)
    assert re.search(r"inputs: visual/score on analysis: \d+ input shapes \(at most 10\), patches [\d.]+% padding, "
                     r"tokens [\d.]+% padding", stdout)
    manifest = json.load(open(os.path.join(workdir, "data", "vggsound", "vggsound.manifest.json")))
    faulty = {standin.clip_name(c): c["fault"] for c in plan["clips"] if c["fault"] in ("no_audio", "truncated")}
    assert {s["clip_id"]: s["reason"] for s in manifest["skipped"]} == {
        k: {"no_audio": "no audio stream", "truncated": "decode error"}[v] for k, v in faulty.items()}
    seed = os.path.join(workdir, "seed_0")
    # Every clip that converted is scored, once, by both models (and the distilled student).
    for split in ("analysis", "test", "train"):
        converted = manifest["splits"][split]["num_examples"]
        names = [("labels", f"{m}-train.jsonl") for m in ("audio", "visual")] if split == "train" else \
            [("eval", m, f"{split}.jsonl") for m in ("audio", "visual", "student_learned")]
        for parts in names:
            ids = [r["clip_id"] for r in _records(os.path.join(seed, *parts))]
            assert len(ids) == len(set(ids)) == converted, parts
    results = json.load(open(os.path.join(workdir, "results.json")))
    # the skipped clips named in the report
    assert {r["clip_id"] for r in results["data_errors"]["converter_skipped"]} == set(faulty)
    assert all(k in open(os.path.join(workdir, "results.md")).read() for k in faulty)
    # results.json complete: both models and the distilled student on both splits, the switch, findings
    assert results["clips"] == {s: manifest["splits"][s]["num_examples"] for s in ("test", "analysis")}
    for label in ("student (original)", "teacher", "student distilled (learned)"):
        for split in ("test", "analysis"):
            assert results["per_seed"][0]["accuracy"][label][split]["num_clips"] == results["clips"][split]
            assert 0 <= results["accuracy"][label][split]["mean"] <= 1
    assert results["switch"]["accuracy"]["per_seed"] and results["switch"]["majority_baseline"]["per_seed"]
    assert [f for f in results["findings"] if f["name"] == "distilled_beats_original"][0]["ci95"] is not None
    assert os.path.exists(os.path.join(seed, "distill", "learned", "adapter", "adapter_model.safetensors"))
    # Compiled programs: within the buckets' bound, fewer than the clips' distinct video layouts.
    programs = results["inputs"]["0"]["programs"]
    assert all(p["within_bound"] for p in programs.values()), programs
    grids = set(_grids(directory, workdir))
    assert programs["visual/score"]["shapes"] < len(grids) and len(grids) >= 8
    assert set(results["inputs"]["0"]["padding"]) >= {"visual/score/test", "audio/score/test",
                                                      "student_learned/train/train"}
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["compute_dtype"] == "bfloat16" and config["data"]["on_error"] == "skip"
    assert config["data"]["worker_count"] >= 1 and config["data"]["question_strategy"] == "uniform"


def _study(directory, workdir):
    from configs import paper
    from distill_jax.stages.common import Study

    config = paper.get_config(f"standin={directory}")
    config.seed = 0
    return Study(config, os.path.join(workdir, "seed_0"), mesh=None, run_dir=workdir)


def _grids(directory, workdir):
    """The video grids of every clip of the scored splits, as the visual transform makes them."""
    study = _study(directory, workdir)
    grids = []
    for split in ("analysis", "test"):
        for batch in study.dataset("visual", split, batch_size=4, all_hosts=True):
            grids += [tuple(g) for g, v in zip(batch["video_grid_thw"], batch["valid"]) if v]
    return grids


def test_questions_over_real_classes_are_fair(made, rehearsal):
    """10 shuffled options of the stand-in's real VGGSound classes, never a class related to the answer."""
    directory, plan = made
    workdir, _ = rehearsal
    study = _study(directory, workdir)
    maker = study.question_maker("test")
    table = study.manifest["related_classes"]["table"]
    assert table["dog barking"] == ["dog bow-wow"] and table["playing timpani"] == ["playing tympani"]
    letters = set()
    for clip in plan["clips"]:
        question = maker(standin.clip_name(clip), clip["label"])
        assert len(question.options) == 10 and set(question.options) <= set(plan["classes"])
        assert not set(question.options) & set(related_classes.load().get(clip["label"], []))
        letters.add(question.answer)
    assert len(letters) >= 8  # shuffled: the answer's letter varies


def test_two_processes_score_what_one_does(made, rehearsal, tmp_path):
    """The evaluate stage on 2 processes x 2 devices: each host pads its own clips, the hosts agree on
    every batch's lengths, and the records equal the 4-device single process's."""
    directory, _ = made
    workdir, _ = rehearsal
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    two = str(tmp_path / "two")
    procs = [subprocess.Popen(_main(two, f"standin={directory}", "--stages=prepare,evaluate",
                                    f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"),
                              env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    for model in ("audio", "visual"):
        for split in ("analysis", "test"):
            a = _records(os.path.join(workdir, "seed_0", "eval", model, f"{split}.jsonl"))
            b = _records(os.path.join(two, "seed_0", "eval", model, f"{split}.jsonl"))
            assert [r["clip_id"] for r in a] == [r["clip_id"] for r in b]
            assert [r["predicted"] for r in a] == [r["predicted"] for r in b]
            np.testing.assert_allclose([r["letter_logits"] for r in a], [r["letter_logits"] for r in b], atol=2e-2,
                                       err_msg=f"{model} {split}")  # bfloat16: a summation order apart
    shapes = json.load(open(os.path.join(two, "seed_0", "input_shapes.json")))["programs"]["visual/score"]["shapes"]
    assert len(shapes) >= 2  # batches of different video layouts met the agreement


def test_rehearsal_argument_gives_the_standins_steps_on_given_paths(made):
    """rehearsal=1 with the paths spelled out is the config standin= makes (a user's own small data)."""
    from configs import paper

    directory, _ = made
    values = paper.standin_values(directory)
    spelled = ",".join(f"{k}={v}" for k, v in values.items() if k != "audio_visual")
    a = paper.get_config(f"standin={directory}")
    b = paper.get_config(f"{spelled},rehearsal=1")
    b.models.audio_visual.path = a.models.audio_visual.path
    assert a.to_dict() == b.to_dict()
    full = paper.get_config(spelled)
    assert full.distill.get("max_steps") != 4 and full.distill.warmup_steps == 100
    with pytest.raises(ValueError, match="rehearsal"):
        paper.get_config(f"{spelled},rehearsal=yes")
