"""Workdirs on cloud storage: the tiny study runs into a `gs://` workdir, served offline by a fake
bucket behind etils.epath (every epath call on gs:// goes to a local directory), and the code that
handles workdir paths uses epath, never os.path or open."""
import base64
import json
import os
import pathlib
import re
from unittest import mock

import numpy as np
import pytest
from etils.epath import testing as epath_testing

from configs import toy
from distill_jax import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Modules that address the workdir (and the manifests, records, checkpoints, model directories in it).
WORKDIR_CODE = ["distill_jax/main.py", "distill_jax/scoring.py", "distill_jax/multihost.py",
                "distill_jax/train/loop.py", "distill_jax/train/checkpoint.py", "distill_jax/train/metrics.py",
                *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "distill_jax" / "stages").glob("*.py"))]
LOCAL_ONLY = re.compile(r"\bos\.path\.(exists|isfile|isdir|join|getsize|abspath)|\bos\.(makedirs|listdir|replace|"
                        r"remove|rename)\b|(?<![.\w])(?<!def )open\(|\bshutil\.")


def test_workdir_code_goes_through_epath():
    offenders = []
    for rel in WORKDIR_CODE:
        for number, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
            if LOCAL_ONLY.search(line) and "CONFIGS" not in line and "_CONFIGS" not in line:
                offenders.append(f"{rel}:{number}: {line.strip()}")
    # main.py finds configs/ next to the package (a local install path, not a workdir).
    assert not offenders, "local-only path handling on workdir paths:\n" + "\n".join(offenders)


@pytest.fixture
def fake_bucket(tmp_path):
    """gs://bucket/... served from tmp_path/gcs/bucket/... for every epath user (ours, orbax, grain,
    JAX's compilation cache), and for orbax's arrays, which TensorStore writes with its own GCS
    driver (pointed at the same local directory); a flat bucket (orbax asks GCS whether it has a
    hierarchical namespace through google-cloud-storage, which real gs:// runs need installed)."""
    from orbax.checkpoint._src.path import gcs_utils

    root = tmp_path / "gcs"

    def local(path):
        text = os.fspath(path)
        return str(root / text[len("gs://"):]) if text.startswith("gs://") else text

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, dst, *args, **kwargs):
        return original(local(path), local(dst), *args, **kwargs)

    def walk(original, top, **kwargs):
        for dirpath, dirs, files in original(local(top), **kwargs):
            yield dirpath.replace(str(root), "gs:/", 1) if str(dirpath).startswith(str(root)) else dirpath, dirs, files

    def glob(original, pattern):
        return [p.replace(str(root), "gs:/", 1) for p in original(local(pattern))]

    fns = {name: one for name in ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree",
                                   "stat")}
    tensorstore_gcs = lambda path: {"driver": "file", "path": local(path)}
    with epath_testing.mock_epath(**fns, rename=two, replace=two, copy=two, walk=walk, glob=glob), \
            mock.patch.object(gcs_utils, "get_kvstore_for_gcs", tensorstore_gcs), \
            mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False):
        yield root


def test_tiny_study_into_a_gs_workdir(fake_bucket, tiny_run):
    import jax

    cache = jax.config.jax_compilation_cache_dir
    try:
        _tiny_study_into_a_gs_workdir(fake_bucket, tiny_run)
    finally:  # main.run pointed JAX's compilation cache into the (now gone) bucket
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", cache)
        compilation_cache.reset_cache()


def _tiny_study_into_a_gs_workdir(fake_bucket, tiny_run):
    config = toy.get_config("tiny=1")
    config.distill.modes = ("learned",)
    config.switch.variants = ("audio_visual", "confidence")  # the switch variants ride along (CI time)
    main.run(config, "gs://bucket/run")
    run = fake_bucket / "bucket" / "run"
    results = json.loads((run / "results.json").read_text())
    assert "student distilled (learned)" in results["accuracy"]
    _switch_variants_are_what_their_records_say(run, results)
    for rel in ("results.md", "findings.png", "seed_0/models/audio/model.safetensors", "seed_0/switch/model",
                "seed_0/labels/learned.jsonl", "seed_0/eval/student_learned/test.jsonl",
                "seed_0/distill/learned/adapter/adapter_model.safetensors", "seed_0/distill/learned/logs/metrics.jsonl"):
        assert (run / rel).exists(), rel
    assert [p for p in (run / "seed_0" / "distill" / "learned" / "checkpoints").iterdir() if p.name.isdigit()]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    logs = run / "seed_0" / "distill" / "learned" / "logs"
    (events,) = logs.glob("events.out.tfevents.*")  # tensorboardX's writer, through epath
    from tensorboard.backend.event_processing import event_file_loader

    logged = {(e.step, v.tag) for e in event_file_loader.LegacyEventFileLoader(str(events)).Load()
              for v in e.summary.value}
    lines = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert logged == {(line["step"], k) for line in lines for k in line if k not in ("step", "time")}
    assert not (pathlib.Path.cwd() / "gs:").exists()  # nothing went to a local directory named "gs:"
    # A second run of the same config (the tiny study, here into gs://) reproduces the first exactly.
    for rel in ("eval/audio/test.jsonl", "eval/visual/test.jsonl", "switch/metrics.json", "labels/learned.jsonl",
                "eval/student_learned/test.jsonl", "distill/learned/batches.jsonl"):
        assert (run / "seed_0" / rel).read_text() == (pathlib.Path(tiny_run) / "seed_0" / rel).read_text(), rel


def _switch_variants_are_what_their_records_say(run, results):
    """Each switch variant: its switch's metrics, its own labels (closed where its probability is at
    least the threshold), its distilled student, compared in analysis.switch_variants; the
    audio_visual switch's side features are the visual tower's mean output per clip."""
    import jax

    from distill_jax.stages.common import Study
    from distill_jax.stages.evaluate import read_records

    seed = run / "seed_0"
    correct = lambda name: [r["predicted"] == r["answer"] for r in read_records(seed / "eval" / name / "test.jsonl")]  # noqa: E731
    variants = results["analysis"]["switch_variants"]
    assert list(variants) == ["audio", "audio_visual", "confidence"]
    for inputs, row in variants.items():
        directory = seed / "switch" if inputs == "audio" else seed / "switch" / "variants" / inputs
        metrics = json.loads((directory / "metrics.json").read_text())
        assert metrics["inputs"] == inputs and row["accuracy"]["mean"] == metrics["eval"]["accuracy"]
        assert row["majority_baseline"]["mean"] == metrics["eval"]["majority_baseline"]
        mode = "learned" if inputs == "audio" else f"learned_{inputs}"
        vs = row["distilled_vs_original"]
        assert (vs["a"], vs["b"]) == (np.mean(correct(f"student_{mode}")), np.mean(correct("audio")))
        assert vs["ci95"][0] <= vs["diff"] <= vs["ci95"][1]
        if inputs != "audio":
            assert row["distilled_vs_main_switch"]["b"] == np.mean(correct("student_learned"))
            probs = {r["clip_id"]: r["prob"] for r in read_records(seed / "labels" / f"switch_{inputs}-train.jsonl")}
            labels = read_records(seed / "labels" / f"{mode}.jsonl")
            assert [r["switch_closed"] for r in labels] == [probs[r["clip_id"]] >= 0.5 for r in labels]
    assert "## Switch variants" in (run / "results.md").read_text()

    seed_config = toy.get_config("tiny=1")
    seed_config.seed = 0  # as main.run sets it for seed 0
    study = Study(seed_config, "gs://bucket/run/seed_0", mesh=None)
    stored = {r["clip_id"]: r["embedding"] for r in read_records(seed / "switch" / "visual_embedding" / "analysis.jsonl")}
    model = study.load_model("visual")
    batch = next(iter(study.dataset("visual", "analysis", batch_size=4)))
    pooled = []
    for pixels, grid in zip(batch["pixel_values_videos"], batch["video_grid_thw"]):  # each clip alone, packed
        t, h, w = (int(v) for v in grid)
        tokens = model.visual(jax.numpy.asarray(pixels[:t, :h * w].reshape(-1, pixels.shape[-1])), ((t, h, w),))
        pooled.append(np.asarray(tokens).mean(0))
    for clip_id, vector in zip(batch["clip_id"], pooled):
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(stored[str(clip_id)]), "<f4"), vector, atol=1e-5)
