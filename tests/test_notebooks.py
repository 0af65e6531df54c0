"""Both Colab notebooks run top to bottom at tiny=True in a real Jupyter kernel (papermill, the
`parameters` cell convention), as a Colab runtime would run them, and show what was computed."""
import json
import os
import pathlib
import shutil

import nbformat
import numpy as np
import papermill
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _execute(name: str, tmp_path, monkeypatch, **parameters):
    # The kernel imports this checkout (the install cell sees distill_jax importable and skips).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = tmp_path / f"{name}.out.ipynb"
    papermill.execute_notebook(str(ROOT / "colab" / f"{name}.ipynb"), str(out), parameters=dict(tiny=True, **parameters),
                               cwd=str(tmp_path), kernel_name="python3", progress_bar=False)
    return nbformat.read(str(out), as_version=4)


def _outputs(notebook, kind: str) -> list:
    return [o["data"][kind] for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if kind in o.get("data", {})]


@pytest.mark.parametrize("name,gpu", [("toy_study", "V5E1"), ("qwen_models", "V6E1")])
def test_notebooks_are_ready_for_a_colab_tpu_runtime(name, gpu):
    notebook = nbformat.read(str(ROOT / "colab" / f"{name}.ipynb"), as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["accelerator"] == "TPU" and notebook.metadata["colab"]["gpuType"] == gpu
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert "tiny = False" in parameters.source and "REPO_URL = " in parameters.source
    install = [c.source for c in notebook.cells if "git\", \"clone\"" in c.source]
    assert len(install) == 1 and "jax[tpu]==" in install[0]
    assert not [c for c in notebook.cells if c.get("outputs")]  # committed without outputs


def test_toy_study_notebook_adds_a_seed_and_pools_the_seeds(tiny_run, tmp_path, monkeypatch):
    """The notebook at seeds=2 (in a Jupyter kernel, its spawn workers started from there) on a
    copy of the tiny study's workdir: seed 0 is reused as it is, seed 1 is a new world run end to
    end, and the report pools both seeds' clips and lists each seed's difference. (That a second
    run reproduces the first exactly is checked by tests/test_cloud_paths.py.)"""
    workdir = tmp_path / "workdir"
    shutil.copytree(tiny_run, workdir)  # with its jax_cache: programs compiled once per session
    monkeypatch.setenv("JAX_DEFAULT_MATMUL_PRECISION", "highest")  # as this session (conftest): the same programs
    notebook = _execute("toy_study", tmp_path, monkeypatch, seeds=2)
    for rel in ("results.json", "eval/student_learned/test.jsonl", "labels/learned.jsonl", "switch/metrics.json"):
        assert (workdir / "seed_0" / rel).read_text() == open(os.path.join(tiny_run, "seed_0", rel)).read(), rel
    pooled = json.loads((workdir / "results.json").read_text())
    assert pooled["seeds"] == [0, 1]
    single = {f["name"]: f for f in json.load(open(os.path.join(tiny_run, "results.json")))["findings"]}
    for f in pooled["findings"]:
        if f["diff"] is None:
            continue
        assert [s["seed"] for s in f["seeds"]] == [0, 1]
        assert f["seeds"][0]["diff"] == single[f["name"]]["diff"]
        clips = [s["clips"] for s in f["seeds"]]
        assert f["clips"] == sum(clips)
        assert f["diff"] == pytest.approx(sum(s["diff"] * n for s, n in zip(f["seeds"], clips)) / sum(clips))
    # Different seeds: a different world.
    assert (workdir / "seed_1" / "eval" / "audio" / "test.jsonl").read_text() != \
        (workdir / "seed_0" / "eval" / "audio" / "test.jsonl").read_text()
    report = (workdir / "results.md").read_text()
    assert "± " in report
    assert report in _outputs(notebook, "text/markdown")  # the notebook shows the report
    assert len(_outputs(notebook, "image/png")) == 3  # per-class accuracy, modality gap, findings


def test_qwen_models_notebook_shows_what_the_models_answer(tmp_path, monkeypatch):
    """The table, the accuracies and the gap the notebook shows are those of the letter
    distributions it computed (tests/test_ask.py checks those against the models themselves)."""
    notebook = _execute("qwen_models", tmp_path, monkeypatch)
    shown = json.loads((tmp_path / "answers.json").read_text())
    answers = np.asarray(shown["answers"])
    table, summary = _outputs(notebook, "text/markdown")
    for modality in ("audio", "visual"):
        p = np.asarray(shown["probabilities"][modality])
        assert p.shape == (4, 10)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        assert shown["accuracy"][modality] == pytest.approx(np.mean(p.argmax(1) == answers))
    rows = table.splitlines()[2:]
    assert len(rows) == 4
    for row, clip, options, answer, audio, visual in zip(rows, shown["clips"], shown["options"], answers,
                                                         shown["probabilities"]["audio"],
                                                         shown["probabilities"]["visual"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == clip and cells[1].startswith(f"{'ABCDEFGHIJ'[answer]}. ")
        for said, p in ((cells[2], audio), (cells[4], visual)):
            k = int(np.argmax(p))
            assert said.startswith(f"{'ABCDEFGHIJ'[k]}. {options[k]}") and said.endswith("✓") == (k == answer)
    assert not np.allclose(shown["probabilities"]["audio"], shown["probabilities"]["visual"], atol=1e-3)
    gap = shown["accuracy"]["visual"] - shown["accuracy"]["audio"]
    assert f"modality gap (visual - audio) {gap:+.2f}" in summary
    assert len(_outputs(notebook, "image/png")) == 1
