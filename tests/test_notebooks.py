"""Both Colab notebooks run top to bottom at tiny=True in a real Jupyter kernel (papermill, the
`parameters` cell convention), as a Colab runtime would run them, and show what was computed."""
import json
import os
import pathlib

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


def test_toy_study_notebook_runs_the_study_and_shows_the_report(tmp_path, monkeypatch):
    notebook = _execute("toy_study", tmp_path, monkeypatch)
    workdir = tmp_path / "workdir"
    results = json.loads((workdir / "results.json").read_text())
    assert "student distilled (learned)" in results["accuracy"]
    assert (workdir / "results.md").read_text() in _outputs(notebook, "text/markdown")
    assert len(_outputs(notebook, "image/png")) == 3  # per-class accuracy, modality gap, findings


def test_qwen_models_notebook_shows_what_the_models_answer(tmp_path, monkeypatch):
    from distill_jax import ask

    notebook = _execute("qwen_models", tmp_path, monkeypatch)
    shown = json.loads((tmp_path / "answers.json").read_text())
    for modality in ("audio", "visual"):
        p = np.asarray(shown["probabilities"][modality])
        assert p.shape == (4, 10)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        assert shown["accuracy"][modality] == pytest.approx(np.mean(p.argmax(1) == np.asarray(shown["answers"])))
        # what the notebook shows is what the saved model says, scored here again
        clip = ask.read_clip(tmp_path / "example_clips" / f"{shown['clips'][1]}.mp4")
        again = ask.letter_probabilities(str(tmp_path / "tiny_models" / modality), modality, [clip],
                                         [shown["options"][1]])
        np.testing.assert_allclose(again[0], p[1], atol=1e-5)
    (table, summary) = _outputs(notebook, "text/markdown")
    assert all(f"| {clip} |" in table for clip in shown["clips"])
    gap = shown["accuracy"]["visual"] - shown["accuracy"]["audio"]
    assert f"modality gap (visual - audio) {gap:+.2f}" in summary
    assert len(_outputs(notebook, "image/png")) == 1
