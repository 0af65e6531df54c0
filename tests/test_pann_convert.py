"""`load_pann` and the restricted `.pth` reader on a tiny Cnn14 saved in PANN's key layout:
round trip, both torch file formats with and without torch, the safetensors copy, and
clear errors for missing / unexpected / mis-shaped keys, a wrong front end, and pickled
objects that are not tensors."""
import os
import sys
from functools import partial

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from distill_jax import sharding
from distill_jax.convert import CheckpointMismatchError, load_pann
from distill_jax.convert.pann import KEY_MAP, MEL, STFT_IMAG, STFT_REAL
from distill_jax.convert.torch_pickle import UnsafeCheckpointError, read_pth
from distill_jax.models.cnn14 import Cnn14, Cnn14Config, default_rngs, mel_filters, stft_basis

CONFIG = Cnn14Config.preset("tiny")
WAVE = (0.1 * np.random.RandomState(0).randn(2, 8000)).astype(np.float32)


class NotATensor:
    """A picklable object that a weights-only reader must refuse."""


def _to_torch_layout(x: np.ndarray) -> np.ndarray:
    return x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1) if x.ndim == 4 else x


@pytest.fixture(scope="module")
def tiny():
    """(our tiny Cnn14 in eval mode with random BN statistics, its PANN-layout state dict of torch tensors)."""
    model = Cnn14(CONFIG, rngs=default_rngs(0))
    rng = np.random.RandomState(1)
    state = {}
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        name = ".".join(map(str, path))
        value = np.asarray(var.get_value())
        if path[-1] in ("mean", "bias"):
            value = 0.1 * rng.randn(*value.shape).astype(np.float32)
        elif path[-1] in ("var", "scale"):
            value = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        var.set_value(value)
        state[KEY_MAP.candidates(name)[0][0]] = torch.tensor(_to_torch_layout(value).copy())
        if path[-1] == "var":
            state[name.rsplit(".", 1)[0] + ".num_batches_tracked"] = torch.tensor(7)
    bins = CONFIG.window_size // 2 + 1
    basis = stft_basis(CONFIG.window_size)
    state[STFT_REAL] = torch.tensor(basis[:, :bins].T[:, None, :].copy())
    state[STFT_IMAG] = torch.tensor(basis[:, bins:].T[:, None, :].copy())
    state[MEL] = torch.tensor(mel_filters(CONFIG.sample_rate, CONFIG.window_size, CONFIG.mel_bins,
                                          CONFIG.fmin, CONFIG.fmax).copy())
    model.eval()
    return model, state


def _save(state, path, *, legacy=False, **extra):
    torch.save({"model": state, "iteration": 1, **extra}, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, waveform):
    return nnx.merge(graphdef, state)(waveform)


def _outputs(model):
    return {k: np.asarray(v) for k, v in _forward(*nnx.split(model), WAVE).items()}


def test_round_trip_infers_the_config_and_writes_a_safetensors_copy(tiny, tmp_path):
    model, state = tiny
    path = _save(state, tmp_path / "tiny.pth")
    loaded = load_pann(path)
    assert loaded.config == CONFIG  # widths from shapes, front end from the 512-window preset
    want, got = _outputs(model), _outputs(loaded)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)
    copy = tmp_path / "tiny.safetensors"
    assert copy.exists()
    for key, value in _outputs(load_pann(str(copy))).items():
        np.testing.assert_array_equal(value, got[key])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_restricted_reader_equals_torch_and_needs_no_torch(tiny, tmp_path, monkeypatch, legacy):
    model, state = tiny
    path = _save(state, tmp_path / "tiny.pth", legacy=legacy)
    by_torch, ours = read_pth(path, reader="torch"), read_pth(path, reader="restricted")
    assert by_torch["iteration"] == ours["iteration"] == 1
    assert set(by_torch["model"]) == set(ours["model"]) == set(state)
    for key, value in by_torch["model"].items():
        assert ours["model"][key].dtype == value.dtype
        np.testing.assert_array_equal(ours["model"][key], value)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails: the restricted reader runs
    loaded = load_pann(path, copy_path=str(tmp_path / "copy.safetensors"))
    for key, value in _outputs(loaded).items():
        np.testing.assert_allclose(value, _outputs(model)[key], atol=1e-6)


def test_non_tensor_objects_are_refused(tiny, tmp_path):
    _, state = tiny
    path = _save(state, tmp_path / "evil.pth", extra=NotATensor())
    for reader in ("torch", "restricted"):
        with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth: refusing to unpickle.*NotATensor"):
            read_pth(path, reader=reader)
    with pytest.raises(UnsafeCheckpointError, match="NotATensor"):
        load_pann(path)
    legacy = _save(state, tmp_path / "evil_legacy.pth", legacy=True, extra=NotATensor())
    with pytest.raises(UnsafeCheckpointError, match="NotATensor"):
        read_pth(legacy, reader="restricted")
    odd = _save({**state, "fc1.weight": "not a tensor"}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth\['model'\]: state dict entries that are not tensors: "
                                         r"'fc1\.weight' \(str\)"):
        load_pann(odd)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    for reader in ("torch", "restricted"):
        with pytest.raises(ValueError, match="junk.pth: not a"):
            read_pth(str(junk), reader=reader)
    assert not os.path.exists(tmp_path / "evil.safetensors")  # nothing written for refused files


def test_mismatched_keys_are_named(tiny, tmp_path):
    _, state = tiny
    missing = {k: v for k, v in state.items() if k != "conv_block3.bn1.running_var"}
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing keys \(1\): conv_block3\.bn1\.running_var \(for conv_block3\.bn1\.var\)"):
        load_pann(_save(missing, tmp_path / "missing.pth"), write_copy=False)
    extra = {**state, "fc2.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): fc2\.weight"):
        load_pann(_save(extra, tmp_path / "extra.pth"), write_copy=False)
    shaped = {**state, "fc_audioset.bias": torch.zeros(11)}
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped keys \(1\): fc_audioset\.bias: checkpoint shape "
                                                      r"\(11,\) -> \(11,\), model fc_audioset\.bias expects \(10,\)"):
        load_pann(_save(shaped, tmp_path / "shaped.pth"), write_copy=False)


def test_a_checkpoint_for_another_front_end_is_an_error(tiny, tmp_path):
    _, state = tiny
    other = mel_filters(CONFIG.sample_rate, CONFIG.window_size, CONFIG.mel_bins, CONFIG.fmin, 7000.0)
    path = _save({**state, MEL: torch.tensor(other.copy())}, tmp_path / "fmax7k.pth")
    with pytest.raises(CheckpointMismatchError, match=r"logmel_extractor\.melW differs from the config's "
                                                      r"\(sample_rate=16000.*fmax=8000\.0\)"):
        load_pann(path, write_copy=False)
    good = _save(state, tmp_path / "good.pth")
    with pytest.raises(CheckpointMismatchError, match=r"conv_real\.weight has shape \(257, 1, 512\); "
                                                      r"the config .* gives \(513, 1, 1024\)"):
        load_pann(good, Cnn14Config.preset("tiny", sample_rate=32000, window_size=1024, hop_size=320,
                                           fmax=14000.0), write_copy=False)


def test_loads_sharded_on_a_mesh(tiny, tmp_path):
    model, state = tiny
    mesh = sharding.make_mesh({"data": -1})
    loaded = load_pann(_save(state, tmp_path / "tiny.pth"), mesh=mesh, write_copy=False)
    kernel = loaded.conv_block2.conv1.kernel[...]
    assert kernel.sharding.mesh.shape == mesh.shape and kernel.sharding.is_fully_replicated
    assert loaded.conv_block2.bn1.var[...].sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(_outputs(loaded)["embedding"], _outputs(model)["embedding"], atol=1e-6)
