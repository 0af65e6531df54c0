"""The study through `distill_jax.main`: a tiny end-to-end run, resumability, preemption, bad configs."""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from configs import paper, toy
from distill_jax import main
from distill_jax.stages.evaluate import read_records

SEED_OUTPUTS = [
    "data/tfrecords/toy_world.manifest.json", "data/design.json", "tokenizer/tokenizer.json",
    "models/audio/config.json", "models/audio/model.safetensors", "models/visual/config.json",
    "eval/audio/analysis.jsonl", "eval/visual/test.jsonl", "eval/visual/unseen.jsonl", "eval/summary.json",
    "switch/metrics.json", "labels/visual-train.jsonl", "labels/audio-train.jsonl", "labels/learned.jsonl",
    "labels/always.jsonl", "labels/never.jsonl", "labels/oracle.jsonl", "distill/learned/adapter/adapter_config.json",
    "distill/learned/adapter/adapter_model.safetensors", "distill/always/logs/metrics.jsonl",
    "eval/student_learned/test.jsonl", "eval/student_always/unseen.jsonl", "eval/student_never/test.jsonl",
    "eval/student_oracle/test.jsonl", "results.json", "timings.json", "data/humans_simulated.csv",
]
STAGE_OUTPUTS = [f"seed_0/{rel}" for rel in SEED_OUTPUTS] + [
    "results.md", "results.json", "per_class_accuracy.png", "modality_gap.png", "findings.png",
    "gap_models_vs_humans.png", "gap_by_class.png"]


def _mtimes(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, workdir)
            if not rel.startswith("jax_cache") and not name.startswith(("results", "timings", "config.json")) \
                    and not rel.endswith(".png"):
                out[rel] = os.stat(path).st_mtime_ns
    return out


def _without_timings(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "timings_s"}


def test_every_stage_writes_outputs_that_parse(tiny_run):
    for rel in STAGE_OUTPUTS:
        assert os.path.getsize(os.path.join(tiny_run, rel)) > 0, rel
    seed = os.path.join(tiny_run, "seed_0")
    results = json.load(open(os.path.join(tiny_run, "results.json")))
    assert set(results["accuracy"]) == {"student (original)", "teacher", "student distilled (learned)",
                                        "student distilled (always)", "student distilled (never)",
                                        "student distilled (oracle)"}
    manifest = json.load(open(os.path.join(seed, SEED_OUTPUTS[0])))
    # The unseen classes come through the AudioSet converter, from the toy world's AudioSet-format files.
    unseen = json.load(open(os.path.join(seed, "data", "tfrecords", "toy_world_unseen.manifest.json")))
    assert unseen["source"]["csv"].endswith(os.path.join("audioset", "eval_segments.csv"))
    for split, entry, classes in (("test", manifest["splits"]["test"], manifest["classes"]),
                                  ("unseen", unseen["splits"]["eval"], unseen["classes"])):
        records = read_records(os.path.join(seed, "eval", "student_learned", f"{split}.jsonl"))
        assert len(records) == entry["num_examples"]  # every clip once
        assert sorted({classes[r["label"]] for r in records}) == sorted(entry["class_counts"])
        assert all(len(r["letter_logits"]) == 20 for r in records)  # the toy's fixed 20-way questions
    assert not set(unseen["classes"]) & set(manifest["splits"]["train"]["class_counts"])
    labels = read_records(os.path.join(seed, "labels", "always.jsonl"))
    assert len(labels) == manifest["splits"]["train"]["num_examples"] and all(r["switch_closed"] for r in labels)
    assert not any(r["switch_closed"] for r in read_records(os.path.join(seed, "labels", "never.jsonl")))
    metrics = [json.loads(line) for line in open(os.path.join(seed, "distill", "learned", "logs", "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1)) and np.isfinite(metrics[-1]["loss"])
    assert json.load(open(os.path.join(seed, "models", "audio", "config.json")))["model_type"] == "qwen2_audio"
    report = open(os.path.join(tiny_run, "results.md")).read()  # shows every plot the report wrote
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(linked) == sorted(["findings.png", "per_class_accuracy.png", "modality_gap.png",
                                     "gap_models_vs_humans.png", "gap_by_class.png"])


def test_the_analysis_puts_models_beside_simulated_humans(tiny_run):
    """results.json's analysis: human accuracy per condition from the simulated responses, each
    model's per-class accuracy on the analysis split, the gap correlation and kappa, from them."""
    from scipy import stats as scipy_stats

    from data_pipelines import humans
    from distill_jax.stages import analysis

    a = json.load(open(os.path.join(tiny_run, "results.json")))["analysis"]
    seed = os.path.join(tiny_run, "seed_0")
    audio = {r["clip_id"]: r for r in read_records(os.path.join(seed, "eval", "audio", "analysis.jsonl"))}
    visual = {r["clip_id"]: r for r in read_records(os.path.join(seed, "eval", "visual", "analysis.jsonl"))}
    classes = json.load(open(os.path.join(seed, SEED_OUTPUTS[0])))["classes"]
    responses = humans.read_responses(os.path.join(seed, "data", "humans_simulated.csv"),
                                      {c: classes[r["label"]] for c, r in audio.items()}, classes)
    assert a["humans"]["simulated"] and a["humans"]["unknown_clip_rows"] == 0 and a["split"] == "analysis"
    assert a["human_accuracy"] == humans.accuracy_by_condition(responses)
    assert set(a["human_accuracy"]) == set(humans.CONDITIONS) and a["human_accuracy"]["audio"]["participants"] == 12
    assert set(a["model_accuracy"]) == {"audio", "video"} and set(a["kappa"]) == {"audio", "video"}  # no AV model
    assert a["model_accuracy"]["audio"]["overall"] == pytest.approx(
        np.mean([r["predicted"] == r["answer"] for r in audio.values()]))
    per_class = lambda recs, name: np.mean([r["predicted"] == r["answer"] for r in recs.values()  # noqa: E731
                                            if classes[r["label"]] == name])
    for gap in a["gaps"]:
        assert gap["model_gap"] == pytest.approx(per_class(visual, gap["class"]) - per_class(audio, gap["class"]))
    x, y = (np.asarray([g[k] for g in a["gaps"]]) for k in ("model_gap", "human_gap"))
    if np.ptp(x) > 0:
        assert a["gap_correlation"]["pearson"]["value"] == pytest.approx(scipy_stats.pearsonr(x, y)[0])
    majority = humans.majority_answers(responses, "audio")  # the audio model's letters are classes (fixed options)
    expected = analysis.cohen_kappa([classes[audio[c]["predicted"]] for c in majority], list(majority.values()))
    assert a["kappa"]["audio"]["value"] == pytest.approx(expected) and a["kappa"]["audio"]["clips"] == len(majority)
    assert "## Models and humans, analysis (simulated participants" in open(os.path.join(tiny_run, "results.md")).read()
    results = json.load(open(os.path.join(tiny_run, "results.json")))
    assert a["unseen"] == {label: results["accuracy"][label]["unseen"] for label in (
        "student (original)", "student distilled (learned)", "student distilled (always)",
        "student distilled (never)", "student distilled (oracle)")}


def test_findings_are_paired_comparisons_of_the_records(tiny_run):
    """Each finding is recomputed here from the two models' per-clip records."""
    from distill_jax import stats

    results = json.load(open(os.path.join(tiny_run, "results.json")))
    text = open(os.path.join(tiny_run, "results.md")).read()
    assert "## Findings (pooled over 1 seed)" in text and "McNemar p" in text
    names = [f["name"] for f in results["findings"]]
    assert names == ["visual_beats_audio", "distilled_beats_original", "distilled_beats_original_teacher_strong",
                     "distilled_beats_teacher", "distilled_keeps_student_strong",
                     "learned_beats_always_student_strong", "learned_beats_never", "distilled_beats_original_unseen"]
    seed = os.path.join(tiny_run, "seed_0")
    record = lambda name, split: {r["clip_id"]: r for r in read_records(os.path.join(seed, "eval", name, f"{split}.jsonl"))}
    by_name = {f["name"]: f for f in results["findings"]}
    for name, a_name, b_name, split in (("distilled_beats_original", "student_learned", "audio", "test"),
                                        ("learned_beats_never", "student_learned", "student_never", "test"),
                                        ("distilled_beats_original_unseen", "student_learned", "audio", "unseen"),
                                        ("visual_beats_audio", "visual", "audio", "test")):
        a, b = record(a_name, split), record(b_name, split)
        ids = sorted(a)
        ca = np.array([a[c]["predicted"] == a[c]["answer"] for c in ids])
        cb = np.array([b[c]["predicted"] == b[c]["answer"] for c in ids])
        f = by_name[name]
        assert f["split"] == split and f["clips"] == len(ids)
        assert f["diff"] == pytest.approx(ca.mean() - cb.mean()) and f["seeds"][0]["diff"] == pytest.approx(f["diff"])
        assert f["p_value"] == pytest.approx(stats.mcnemar_p(ca, cb))
        assert f["ci95"][0] <= f["diff"] <= f["ci95"][1]
        assert f["holds"] == (f["diff"] > 0 and f["p_value"] < 0.05)
    keeps = by_name["distilled_keeps_student_strong"]
    if keeps["diff"] is not None:
        assert keeps["holds"] == (keeps["ci95"][0] >= -0.02)
    # The groups a finding restricts to are the per-seed measured ones, also in the per-seed results.
    per_seed = json.load(open(os.path.join(seed, "results.json")))
    assert per_seed["groups"]["teacher-strong"] == results["per_seed"][0]["groups"]["teacher-strong"]
    assert results["switch"]["accuracy"]["per_seed"] == [per_seed["switch"]["eval"]["accuracy"]]


def test_rerun_does_no_work_again(tiny_run, capsys):
    before = _mtimes(tiny_run)
    main.run(toy.get_config("tiny=1"), tiny_run)
    assert _mtimes(tiny_run) == before
    out = capsys.readouterr().out
    assert "distill: learned done" in out and "switch: " in out and "skipped" in out


def _copy_without_distill(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("distill", "student_*"))


@pytest.mark.parametrize("edit,match", [
    (lambda c: None, "unknown stage"),
    (lambda c: setattr(c, "direction", "sideways"), "config.direction='sideways'"),
    (lambda c: setattr(c.distill, "modes", ("learned", "sometimes")), "config.distill.modes"),
    (lambda c: setattr(c.distill, "loss", "soft"), "config.distill.loss='soft'"),
    (lambda c: setattr(c.distill, "remat", "most"), "config.distill.remat='most'"),
    (lambda c: setattr(c.models, "attention_impl", "splash"), "config.models.attention_impl='splash'"),
    (lambda c: setattr(c.distill, "batch_size", 0), r"config.distill.batch_size=0: expected an integer in \[1, inf\)"),
    (lambda c: setattr(c.evaluate, "batch_size", -8), r"config.evaluate.batch_size=-8: expected an integer in \[1"),
    (lambda c: setattr(c.distill, "accumulate_steps", 0), r"config.distill.accumulate_steps=0: expected an integer"),
    (lambda c: setattr(c.distill, "checkpoint_every", 0), r"config.distill.checkpoint_every=0: expected an integer"),
    (lambda c: setattr(c.distill, "learning_rate", float("nan")), r"config.distill.learning_rate=nan: expected a "
                                                                  r"number in \(0, inf\)"),
    (lambda c: setattr(c.evaluate, "splits", ("test", "tset")), r"config.evaluate.splits=\('test', 'tset'\): "
                                                                r"expected split names from"),
    (lambda c: setattr(c.label, "split", "training"), "config.label.split='training': expected one of"),
    (lambda c: setattr(c.data, "on_error", "ignore"), r"config.data.on_error='ignore': expected one of \('raise', "
                                                      r"'skip'\)"),
    (lambda c: setattr(c.data, "max_error_fraction", 1.5), r"config.data.max_error_fraction=1.5: expected a number "
                                                           r"in \[0, 1\]"),
    (lambda c: setattr(c.switch, "threshold", 1.0), r"config.switch.threshold=1.0: expected a number in \(0, 1\)"),
    (lambda c: setattr(c.distill, "max_nonfinite_steps", 0), "config.distill.max_nonfinite_steps=0"),
    (lambda c: setattr(c.distill.lora, "targets", ("qq_proj",)), "config.distill.lora.targets"),
    (lambda c: setattr(c.mesh, "fsdp", 0), "config.mesh.fsdp=0: expected an integer >= 1, or -1"),
    (lambda c: setattr(c.distill, "batch_size", 12), r"config.distill.batch_size=12: expected a multiple of 8"),
    (lambda c: setattr(c, "teacher", "omni"), r"config.teacher='omni': expected one of \('audio_visual',\) or None"),
    (lambda c: setattr(c, "teacher", "audio_visual"), r"config.teacher='audio_visual' needs an audio-visual model"),
    (lambda c: setattr(c.data.unseen, "distractors", "seen"), r"config.data.unseen.distractors='seen': expected one "
                                                              r"of \('unseen', 'all'\)"),
    (lambda c: setattr(c.models.audio_visual, "conditions", ("audio", "sounded")),
     r"config.models.audio_visual.conditions=\('audio', 'sounded'\): expected distinct names"),
])
def test_bad_config_values_are_named(edit, match, tmp_path):
    config = toy.get_config()
    edit(config)
    stages = ["prepare", "evaluatee"] if match == "unknown stage" else None
    with pytest.raises(main.ConfigError, match=match):
        main.run(config, str(tmp_path), stages)
    assert not os.listdir(tmp_path)  # refused before any work


def test_every_config_error_is_named_at_once(tmp_path):
    config = toy.get_config()
    config.distill.batch_size, config.distill.warmup_steps, config.switch.epochs = 0, -1, 0
    with pytest.raises(main.ConfigError, match="3 config values cannot work") as error:
        main.run(config, str(tmp_path))
    assert all(k in str(error.value) for k in ("distill.batch_size", "distill.warmup_steps", "switch.epochs"))


def test_mesh_that_does_not_divide_the_devices_is_named(tmp_path):
    config = toy.get_config()
    config.mesh.fsdp = 3
    with pytest.raises(main.ConfigError, match=f"config.mesh=.* does not fit the {jax.device_count()} devices"):
        main.run(config, str(tmp_path))


def test_paper_config_needs_its_checkpoints(tmp_path):
    config = paper.get_config(f"audio={tmp_path}/nowhere,manifest={tmp_path}/m.json")
    with pytest.raises(main.ConfigError, match="config.models.audio.path=.*nowhere.* is not a checkpoint"):
        main.run(config, str(tmp_path / "w"))
    config = paper.get_config(f"audio_visual={tmp_path}/no_omni,teacher=audio_visual")
    with pytest.raises(main.ConfigError, match="config.models.audio_visual.path=.*no_omni.* is not a checkpoint"):
        main.run(config, str(tmp_path / "w"))
    config = paper.get_config(f"unseen_manifest={tmp_path}/no_audioset.json")
    assert "unseen" in config.evaluate.splits and "unseen" in config.distill.eval_splits
    with pytest.raises(main.ConfigError, match="config.data.unseen.manifest=.*no_audioset.json.* does not exist"):
        main.run(config, str(tmp_path / "w"))
    with pytest.raises(ValueError, match="mesh='8'"):
        paper.get_config("mesh=8")
    runs = []
    paper.sweep(lambda **kw: runs.append(kw))
    assert {"distill.modes": ("always",)} in runs and {"switch.inputs": "audio_visual"} in runs and len(runs) == 7


def test_an_unseen_split_must_be_new_to_the_distillation_and_ask_its_own_questions(tiny_run, tmp_path):
    """The unseen manifest's classes may not have clips in the splits distilled on; its questions
    draw from the run's classes ("all") or the unseen ones; each error names the file and classes."""
    from distill_jax.stages.common import Study

    seed = os.path.join(tiny_run, "seed_0", "data", "tfrecords")
    unseen = json.load(open(os.path.join(seed, "toy_world_unseen.manifest.json")))
    config = toy.get_config("tiny=1")
    config.data.manifest = os.path.join(seed, "toy_world.manifest.json")
    config.data.unseen.manifest = os.path.join(seed, "toy_world_unseen.manifest.json")
    study = Study(config, str(tmp_path / "w"), mesh=None)
    assert study.classes_of("unseen") == unseen["classes"]
    assert study.num_examples("unseen") == unseen["splits"]["eval"]["num_examples"] == 40
    # "all": the fixed 20-class question the models learned, the same as on the seen splits.
    assert study.question_maker("unseen")("clip", "owl hooting") == study.question_maker("test")("clip", "owl hooting")
    config.data.unseen.distractors = "unseen"
    with pytest.raises(ValueError, match=r"questions about split 'unseen' \(.*toy_world_unseen.manifest.json, "
                                         r"config.data.unseen.distractors='unseen'\): num_options=20 but the class list "
                                         r"has only 4 classes"):
        study.question_maker("unseen")
    config.data.question_strategy, config.data.num_options = "uniform", 3
    assert set(study.question_maker("unseen")("clip", "owl hooting").options) <= set(unseen["classes"])

    overlapping = json.loads(json.dumps(unseen))
    overlapping["classes"].append("chainsaw")
    overlapping["splits"]["eval"]["class_counts"]["chainsaw"] = 1
    for bad, match in ((overlapping, r"bad.manifest.json: the unseen split 'eval' holds clips of 1 classes that "
                                     r"the study distils on \(.*toy_world.manifest.json, splits \['train', "
                                     r"'analysis'\]\): \['chainsaw'\]"),
                       (dict(unseen, splits={"test": unseen["splits"]["eval"]}),
                        r"bad.manifest.json: no split 'eval' \(config.data.unseen.split; the manifest has \['test'\]\)")):
        (tmp_path / "bad.manifest.json").write_text(json.dumps(bad))
        config.data.unseen.manifest = str(tmp_path / "bad.manifest.json")
        with pytest.raises(ValueError, match=match):
            Study(config, str(tmp_path / "w"), mesh=None).num_examples("unseen")


def test_non_finite_steps_are_skipped_then_stop_the_run_with_only_finite_checkpoints(tiny_run, tmp_path, capsys):
    workdir = str(tmp_path / "nan")
    _copy_without_distill(tiny_run, workdir)
    config = toy.get_config("tiny=1")
    config.distill.modes = ("learned",)
    config.distill.checkpoint_every = 1
    config.distill.learning_rate = 1e38  # the first update sends the adapters to ~1e38: every later loss is inf/NaN
    config.distill.warmup_steps = 0
    with pytest.raises(FloatingPointError, match=r"distill learned: 3 consecutive non-finite steps up to step (\d+) "
                                                 r"\(loss (nan|inf)\), none applied; stopped\. The last checkpoint is "
                                                 r"step \d+") as error:
        main.run(config, workdir, ["distill"])
    last, saved = (int(n) for n in re.findall(r"step (\d+)", str(error.value)))
    assert saved == last - 1 >= 3 and capsys.readouterr().out.count("the update was skipped") == 3
    import orbax.checkpoint as ocp
    ckpts = os.path.join(workdir, "seed_0", "distill", "learned", "checkpoints")
    for step in sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()):
        state = ocp.StandardCheckpointer().restore(os.path.join(ckpts, str(step), "train"))
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"])), step
        assert int(state["nonfinite_total"]) == max(0, step - (last - 3))
    assert not os.path.exists(os.path.join(workdir, "seed_0", "distill", "learned", "adapter"))


def test_audio_to_vl_direction_with_the_audio_visual_teacher(tiny_run, tmp_path):
    """The visual model as the student (labels, distillation of Qwen2-VL: static grids), taught by
    the audio-visual model (a tiny Qwen2.5-Omni, warm-started on sounded video) and scored on its
    three conditions; the audio and visual models and their scores are reused as they are."""
    from data_pipelines import transforms
    from distill_jax.convert import load_hf
    from distill_jax.stages import switch as switch_stage
    from distill_jax.stages.common import Study

    workdir = str(tmp_path / "a2v")
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("switch", "labels", "distill", "student_*",
                                                                     "results*"))
    assert Study(toy.get_config("tiny=1,direction=audio_to_vl"), workdir, None).teacher == "audio"
    config = toy.get_config("tiny=1,direction=audio_to_vl,teacher=audio_visual")
    config.distill.modes = ("always",)  # no switch to train: its answers() are checked below
    config.distill.eval_splits = ("test",)
    config.evaluate.splits = ("analysis", "test")  # the audio-visual model's conditions: not on unseen
    config.seed = 0
    before = _mtimes(workdir)
    main.run(config, workdir, ["warm_start", "evaluate", "label", "distill", "report"])
    after = _mtimes(workdir)
    assert [rel for rel in before if "models/" in rel or "eval/audio/" in rel or "eval/visual/" in rel
            if after[rel] != before[rel]] == []
    with pytest.raises(main.ConfigError, match="made with direction='audio_to_vl'"):
        main.run(toy.get_config("tiny=1"), workdir, ["report"])
    with pytest.raises(main.ConfigError, match="made with teacher='audio_visual'"):
        main.run(toy.get_config("tiny=1,direction=audio_to_vl"), workdir, ["report"])
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert (results["teacher"], results["student"]) == ("audio_visual_audio_video", "visual")
    for condition in ("audio only", "silent video", "sounded video"):
        assert set(results["accuracy"][f"audio-visual reference ({condition})"]) == {"analysis", "test"}
    seed = os.path.join(workdir, "seed_0")
    adapter = json.load(open(os.path.join(seed, "distill", "always", "adapter", "adapter_config.json")))
    assert "language_model" in adapter["target_modules"] and "visual" not in adapter["target_modules"]
    labels = read_records(os.path.join(seed, "labels", "always.jsonl"))
    teacher_train = {r["clip_id"]: r for r in read_records(os.path.join(seed, "labels",
                                                                         "audio_visual_audio_video-train.jsonl"))}
    assert all(r["teacher_letter"] == teacher_train[r["clip_id"]]["predicted"] for r in labels)

    study = Study(config, seed, None)
    ids, answers = switch_stage.answers(study, "analysis")  # what the switch learns from: the sounded video's
    av = {r["clip_id"]: r["predicted"] for r in read_records(os.path.join(seed, "eval", "audio_visual_audio_video",
                                                                        "analysis.jsonl"))}
    assert answers["teacher_answers"] == [av[c] for c in ids]

    # The scored letters are the public call's: one test clip, unpadded, eagerly, as a user calls the model.
    name = "audio_visual_audio_video"
    transform = study.transform(name)
    assert isinstance(transform, transforms.Qwen2_5OmniTransform)
    model = load_hf(os.path.join(seed, "models", "audio_visual"))
    batch = next(iter(study.dataset(name, "test", batch_size=8)))
    row = int(np.flatnonzero(batch["valid"])[0])
    real = batch["attention_mask"][row].astype(bool)
    t, h, w = (int(v) for v in batch["video_grid_thw"][row])
    packed = batch["pixel_values_videos"][row, :t, :h * w].reshape(-1, batch["pixel_values_videos"].shape[-1])
    logits = np.asarray(model(
        input_ids=batch["input_ids"][row][real][None], input_features=batch["input_features"][row:row + 1],
        feature_attention_mask=batch["feature_attention_mask"][row:row + 1],
        pixel_values_videos=packed, video_grid_thw=batch["video_grid_thw"][row:row + 1],
        video_second_per_grid=[transform.config.temporal_patch_size / transform.config.fps], use_audio_in_video=True))
    scored = {r["clip_id"]: r for r in read_records(os.path.join(seed, "eval", name, "test.jsonl"))}
    np.testing.assert_allclose(scored[str(batch["clip_id"][row])]["letter_logits"],
                               logits[0, -1, study.letter_ids(name)], atol=1e-4)


def test_outputs_made_with_other_config_values_are_refused_not_reused(tiny_run, tmp_path):
    """Rerunning a workdir with --config.distill.loss=logits used to skip both modes as done and
    rewrite config.json to say logits; now it is refused before any work, naming the change."""
    workdir = str(tmp_path / "again")
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("jax_cache"))
    before = open(os.path.join(workdir, "config.json")).read()
    config = toy.get_config("tiny=1")
    config.distill.loss = "logits"
    with pytest.raises(main.ConfigError, match=r"the distill stage's outputs were made with other config values "
                                               r"\(distill.loss: 'labels' -> 'logits'\).*delete distill"):
        main.run(config, workdir)
    assert open(os.path.join(workdir, "config.json")).read() == before
    config = toy.get_config("tiny=1")
    config.switch.threshold = 0.7  # upstream of label and distill: the first stage it changes is named
    with pytest.raises(main.ConfigError, match=r"the distill stage's .*switch.threshold: 0.5 -> 0.7.*delete switch, "
                                               r"labels, distill"):
        main.run(config, workdir, ["distill"])
    config = toy.get_config("tiny=1")
    config.distill.log_every, config.evaluate.batch_size = 3, 16  # run-only values: reused as they are
    main.run(config, workdir, ["distill"])


def test_the_toy_sweep_runs_each_entry_reusing_what_it_does_not_change(tiny_run, tmp_path, capsys):
    from distill_jax import sweep

    root = tmp_path / "sweep"
    names = [n for n, _ in sweep.entries(toy.__file__)]
    assert names == ["distill.loss=logits_distill.temperature=2.0", "switch.label_mode=sample"]
    config = toy.get_config("tiny=1")
    config.distill.modes = ("learned",)  # the entries' other modes run the same code (CI time)
    table = sweep.run(config, toy.__file__, str(root), base=tiny_run)
    out = capsys.readouterr().out
    # The loss ablation reuses every stage up to the labels; the switch ablation up to the evaluation.
    assert f"== sweep entry {names[0]}: reused {{0: ['prepare', 'warm_start', 'evaluate', 'switch', 'label']}}" in out
    assert f"== sweep entry {names[1]}: reused {{0: ['prepare', 'warm_start', 'evaluate']}}" in out
    for name in names:
        stages = json.load(open(root / name / "seed_0" / "stage_configs.json"))
        assert set(stages) == {"prepare", "warm_start", "evaluate", "switch", "label", "distill"}
    base = json.loads(open(os.path.join(tiny_run, "seed_0", "labels", "learned.jsonl")).readline())
    assert json.loads(open(root / names[0] / "seed_0" / "labels" / "learned.jsonl").readline()) == base
    results = json.load(open(root / names[0] / "results.json"))
    assert json.load(open(root / names[0] / "config.json"))["distill"]["loss"] == "logits"
    assert set(table) == set(names)
    assert table[names[0]]["findings"]["distilled_beats_original"]["diff"] == pytest.approx(
        next(f["diff"] for f in results["findings"] if f["name"] == "distilled_beats_original"))
    text = (root / "sweep.md").read_text()
    assert all(f"| {name} |" in text for name in names) and "distilled_beats_original" in text


def test_a_script_without_a_main_guard_gets_a_clear_error_not_a_hang(tmp_path):
    """spawn workers re-import the calling script; one that runs the study at top level would run
    it again in every worker. The workers refuse, and the parent names the fix."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text("from configs import toy\nfrom distill_jax import main\n"
                      "config = toy.get_config('tiny=1')\nconfig.data.world.workers = 2\n"
                      f"main.run(config, {str(tmp_path / 'w')!r})\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    assert "WorkersCannotStartError" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr
    assert "called while a worker process was starting" in done.stderr  # the worker's own error


def test_a_long_compile_prints_its_name_while_compiling_then_its_time(capsys):
    import time

    import jax.numpy as jnp

    announcer = main.CompileAnnouncer(after_s=0.0)  # every compile counts as long here
    announcer.register()
    try:
        @jax.jit
        def a_program_of_many_layers(x):
            for i in range(60):
                x = jnp.tanh(x @ x.T + i)
            return x

        start = time.time()
        a_program_of_many_layers(jnp.ones((7, 7))).block_until_ready()
        took = time.time() - start
        count = announcer.compiles
        assert count >= 1 and 0 < announcer.compile_seconds <= took + 0.1
        a_program_of_many_layers(jnp.ones((7, 7))).block_until_ready()  # compiled: not counted again
        assert announcer.compiles == count
        a_program_of_many_layers(jnp.ones((5, 5))).block_until_ready()  # another shape: compiled again
        assert announcer.compiles > count
    finally:
        announcer.unregister()
    out = capsys.readouterr().out
    assert "compiling jit(a_program_of_many_layers) (running for 0 s) ..." in out
    seconds = float(re.search(r"compiled jit\(a_program_of_many_layers\) in ([\d.]+) s", out).group(1))
    assert 0 <= seconds <= took + 0.1
    assert out.index("compiling jit(a_program") < out.index("compiled jit(a_program")
