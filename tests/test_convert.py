"""The HF converter: sharded and bf16 checkpoints, and clear errors for keys that do not match."""
import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from distill_jax.convert import CheckpointMismatchError, load_hf, save_hf
from distill_jax.convert.safetensors_io import SafetensorsCheckpoint


def _rewrite(src, dst, edit):
    """Copy checkpoint `src` to `dst` with its tensors passed through `edit(dict) -> dict`."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    save_file(edit(load_file(os.path.join(src, "model.safetensors"))), os.path.join(dst, "model.safetensors"))
    return dst


def _logits(model, ids):
    return np.asarray(model(input_ids=ids), np.float32)


IDS = np.arange(10).reshape(1, 10)


def test_sharded_checkpoint_loads_like_single_file(tiny_qwen2_dir):
    single, _ = tiny_qwen2_dir()
    sharded, _ = tiny_qwen2_dir(max_shard_size="100KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    np.testing.assert_array_equal(_logits(load_hf(sharded), IDS), _logits(load_hf(single), IDS))


def test_bf16_checkpoint_reads_exact_values(tiny_qwen2_dir):
    path, _ = tiny_qwen2_dir(dtype=torch.bfloat16, seed=3)
    ckpt = SafetensorsCheckpoint(path)
    weight = ckpt.get("model.layers.0.mlp.up_proj.weight")
    assert weight.dtype == jnp.bfloat16
    model = load_hf(path, dtype=jnp.bfloat16)
    kernel = model.model.layers.mlp.up_proj.kernel[...][0]  # layer 0 of the stacked layers
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), np.asarray(weight, np.float32).T)
    assert np.isfinite(_logits(model, IDS)).all()


def test_missing_key_is_named(tiny_qwen2_dir, tmp_path):
    src, _ = tiny_qwen2_dir()
    dst = _rewrite(src, str(tmp_path / "ckpt"),
                   lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_proj.bias"})
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_hf(dst)


def test_unexpected_key_is_named(tiny_qwen2_dir, tmp_path):
    src, _ = tiny_qwen2_dir()
    dst = _rewrite(src, str(tmp_path / "ckpt"),
                   lambda t: {**t, "model.layers.0.extra.weight": np.zeros((3,), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): model\.layers\.0\.extra\.weight"):
        load_hf(dst)


def test_wrong_shape_is_named(tiny_qwen2_dir, tmp_path):
    src, _ = tiny_qwen2_dir()
    dst = _rewrite(src, str(tmp_path / "ckpt"),
                   lambda t: {**t, "model.layers.0.mlp.up_proj.weight": np.zeros((96, 60), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped keys \(1\): model\.layers\.0\.mlp\.up_proj\.weight"):
        load_hf(dst)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_a_tensor_of_another_kind_is_refused_not_cast(tiny_qwen2_dir, tmp_path, dtype):
    src, _ = tiny_qwen2_dir()
    key = "model.layers.1.mlp.down_proj.weight"
    dst = _rewrite(src, str(tmp_path / "ckpt"), lambda t: {**t, key: (t[key] * 100).astype(dtype)})
    kind = "bool" if dtype is np.bool_ else "int"
    with pytest.raises(CheckpointMismatchError, match=rf"{key}: checkpoint dtype {np.dtype(dtype)} \({kind}\), model "
                                                      r"model.layers.1.mlp.down_proj.kernel expects float32 \(float\)"):
        load_hf(dst)


def test_a_truncated_checkpoint_names_the_file_and_first_cut_tensor(tiny_qwen2_dir, tmp_path):
    src, _ = tiny_qwen2_dir()
    dst = tmp_path / "cut"
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    header = json.loads(file.read_bytes()[8:8 + int.from_bytes(file.read_bytes()[:8], "little")])
    tensors = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (start, end), first = tensors[len(tensors) // 2]
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - (tensors[-1][0][1] - start) + 1)  # cut inside the middle tensor
    with pytest.raises(ValueError, match=rf"model.safetensors: truncated .*tensor '{first}' needs data bytes "
                                         rf"{start}..{end}"):
        load_hf(str(dst))


def test_tied_checkpoint_may_carry_lm_head_copy(tiny_qwen2_dir, tmp_path):
    src, _ = tiny_qwen2_dir(tie_word_embeddings=True)
    assert "lm_head.weight" not in SafetensorsCheckpoint(src)
    dst = _rewrite(src, str(tmp_path / "ckpt"),
                   lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    np.testing.assert_array_equal(_logits(load_hf(dst), IDS), _logits(load_hf(src), IDS))


def test_bad_directories_are_named(tiny_qwen2_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(str(tmp_path))
    src, _ = tiny_qwen2_dir()
    other = tmp_path / "other"
    other.mkdir()
    config = json.load(open(os.path.join(src, "config.json")))
    json.dump({**config, "model_type": "llama"}, open(other / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        load_hf(str(other))
    json.dump(config, open(other / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(str(other))
    (other / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_hf(str(other))


@pytest.mark.parametrize("fixture", ["tiny_qwen2_dir", "tiny_qwen2_audio_dir", "tiny_qwen2_vl_dir"])
def test_save_hf_writes_the_checkpoint_it_loaded(fixture, request, tmp_path):
    """load_hf -> save_hf gives back the transformers checkpoint key for key, value for value
    (incl. Qwen2-VL's Conv3d patch embedding), so our models load in transformers and back."""
    made = request.getfixturevalue(fixture)
    src = (made(tie_word_embeddings=True) if callable(made) else made)[0]
    out = save_hf(load_hf(src), str(tmp_path / "out"))
    original = {}
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            original.update(load_file(os.path.join(src, name)))
    written = load_file(os.path.join(out, "model.safetensors"))
    ignorable = [k for k in original if k.endswith("rotary_emb.inv_freq")
                 or (k == "lm_head.weight" and k not in written)]
    assert sorted(written) == sorted(k for k in original if k not in ignorable)
    for key, value in written.items():
        np.testing.assert_array_equal(value, original[key].astype(np.float32), err_msg=key)
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == \
        json.load(open(os.path.join(src, "config.json")))["model_type"]
    reloaded = load_hf(out)  # and it loads back through the same path
    assert reloaded.config == load_hf(src).config


def _ours(family: str, tied: bool):
    """A small random model of ours (non-trivial weights), as the warm start makes the toy's."""
    from flax import nnx

    from distill_jax.models import qwen2, qwen2_audio, qwen2_vl

    text = dataclasses.replace(qwen2.Qwen2Config.preset("tiny"), tie_word_embeddings=tied)
    if family == "qwen2":
        return qwen2.Qwen2ForCausalLM(text, rngs=nnx.Rngs(7))
    if family == "qwen2_audio":
        config = dataclasses.replace(qwen2_audio.Qwen2AudioConfig.preset("tiny"), text=text)
        return qwen2_audio.Qwen2AudioForConditionalGeneration(config, rngs=nnx.Rngs(7))
    config = dataclasses.replace(qwen2_vl.Qwen2VLConfig.preset("tiny"), text=dataclasses.replace(
        text, mrope_section=qwen2_vl.Qwen2VLConfig.preset("tiny").text.mrope_section))
    return qwen2_vl.Qwen2VLForConditionalGeneration(config, rngs=nnx.Rngs(7))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", ["qwen2", "qwen2_audio", "qwen2_vl"])
def test_save_hf_output_loads_in_transformers_with_the_same_logits(family, tied, tmp_path):
    """Our model -> save_hf -> transformers' from_pretrained: nothing missing or unexpected (a tied
    lm_head is tied there too), and the same text logits (<= 1e-5)."""
    import transformers

    model = _ours(family, tied)
    out = save_hf(model, str(tmp_path / "hf"))
    classes = {"qwen2": transformers.Qwen2ForCausalLM, "qwen2_audio": transformers.Qwen2AudioForConditionalGeneration,
               "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}
    theirs, info = classes[family].from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = np.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        expected = theirs.eval()(input_ids=torch.tensor(ids)).logits.float().numpy()
    got = np.asarray(model(input_ids=ids), np.float32) if family == "qwen2" else \
        np.asarray(model.language_model(input_ids=ids), np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    text = lambda m: m if family == "qwen2" else m.language_model
    np.testing.assert_array_equal(np.asarray(text(load_hf(out))(input_ids=ids)), got)  # and back into ours


def test_a_qwen2_audio_lm_head_that_differs_from_the_embedding_is_used_as_transformers_does(tmp_path):
    """transformers never ties Qwen2-Audio's lm_head: a checkpoint whose config says tied but whose
    lm_head differs loads untied here too, with transformers' logits."""
    import transformers

    out = save_hf(_ours("qwen2_audio", True), str(tmp_path / "hf"))
    tensors = load_file(os.path.join(out, "model.safetensors"))
    key = "language_model.lm_head.weight"
    tensors[key] = tensors[key] + np.random.default_rng(0).normal(0, 0.1, tensors[key].shape).astype(np.float32)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    ours = load_hf(out)
    assert not ours.config.text.tie_word_embeddings
    ids = np.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        expected = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(out).eval()(
            input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.language_model(input_ids=ids)), expected, atol=1e-5, rtol=0)

