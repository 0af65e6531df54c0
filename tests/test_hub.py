"""Hub ids load like local directories, offline, from a Hugging Face cache laid out as
huggingface_hub writes it (models--owner--name/snapshots/<commit>/, refs/main)."""
import os
import shutil

import numpy as np
import pytest

from distill_jax import hub
from distill_jax.convert import load_hf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_qwen2_dir):
    """tiny-org/tiny-qwen2 in a fake cache (the tests run with HF_HUB_OFFLINE=1: no network)."""
    from huggingface_hub import constants

    src, _ = tiny_qwen2_dir()
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen2"
    shutil.copytree(src, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert constants.HF_HUB_OFFLINE
    return src


def test_a_hub_id_loads_from_the_cache_like_its_directory(hub_cache, monkeypatch):
    ids = np.arange(10).reshape(1, 10)
    snapshot = hub.checkpoint_dir("tiny-org/tiny-qwen2")
    assert snapshot.endswith(os.path.join("snapshots", COMMIT))
    np.testing.assert_array_equal(np.asarray(load_hf("tiny-org/tiny-qwen2")(input_ids=ids)),
                                  np.asarray(load_hf(hub_cache)(input_ids=ids)))
    with pytest.raises(FileNotFoundError, match="tiny-org/other: not a local directory, and as a hub id it is not in "
                                                "the Hugging Face cache"):
        load_hf("tiny-org/other")


def test_local_paths_win_over_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not hub.is_hub_id("owner/name") and hub.checkpoint_dir("owner/name") == "owner/name"
    assert hub.is_hub_id("Qwen/Qwen2-Audio-7B-Instruct") and not hub.is_hub_id("gs://bucket/ckpt")
    assert not hub.is_hub_id("/abs/path/ckpt") and not hub.is_hub_id("a/b/c")


def test_config_paths_take_hub_ids(hub_cache, tmp_path):
    from configs import paper
    from distill_jax import main
    from distill_jax.stages.common import Study

    config = paper.get_config(f"audio=tiny-org/tiny-qwen2,visual=tiny-org/tiny-qwen2,manifest={tmp_path}/m.json")
    with pytest.raises(main.ConfigError) as error:
        main.check_config(config, ["prepare"])
    assert "config.models" not in str(error.value)  # only the missing manifest and PANN file are refused
    study = Study(config, tmp_path / "w", mesh=None)
    assert str(study.model_dir("audio")).endswith(os.path.join("snapshots", COMMIT))


@pytest.mark.parametrize("what, ids", [("qwen", "QWEN_IDS"), ("omni", "OMNI_IDS")])
def test_download_qwen_fills_the_cache_and_prints_each_snapshot(hub_cache, monkeypatch, capsys, what, ids):
    from distill_jax import download

    monkeypatch.setattr(download, ids, ("tiny-org/tiny-qwen2",))
    download.main([what])
    (printed,) = capsys.readouterr().out.split()
    assert printed.endswith(os.path.join("snapshots", COMMIT)) and os.path.exists(os.path.join(printed, "config.json"))
