"""Our Qwen2-VL (through the production converter) vs Hugging Face's, in float32."""
import copy
import os

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from data_pipelines.vision import num_vision_tokens, preprocess_image, preprocess_video
from distill_jax.convert import load_hf
from distill_jax.layers.scan import layer_paths
from distill_jax.models import lora
from distill_jax.models.qwen2_vl import mrope_positions

IMAGE, VIDEO, START, END = 290, 291, 292, 293


def _frames(rng, count, height=60, width=90):
    return rng.randint(0, 256, (count, height, width, 3), dtype=np.uint8)


def _left_pad(rows):
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def _media_run(token, grid):
    return [START] + [token] * num_vision_tokens(grid) + [END]


def _hf_logits(hf, ids, mask, **media):
    mm = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    kwargs = {k: torch.tensor(v) for k, v in media.items() if v is not None}
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  mm_token_type_ids=torch.tensor(mm), **kwargs).logits.numpy()


def _inputs(case, seed=0):
    rng = np.random.RandomState(seed)
    if case == "image":
        pixels, grid = preprocess_image(_frames(rng, 1)[0])
        ids, mask = _left_pad([[5, 6] + _media_run(IMAGE, grid) + [7, 8]])
        return ids, mask, dict(pixel_values=pixels, image_grid_thw=np.array([grid]))
    pixels, grid = preprocess_video(_frames(rng, 4))  # 4 frames -> t = 2
    rows = [[5, 6] + _media_run(VIDEO, grid) + [7, 8, 9]]
    if case == "video+text":
        rows.append([10, 11, 12, 13, 14])  # a text-only row, left-padded
    ids, mask = _left_pad(rows)
    return ids, mask, dict(pixel_values_videos=pixels, video_grid_thw=np.array([grid]))


@pytest.mark.parametrize("case", ["image", "video", "video+text"])
def test_logits_match_hf(tiny_qwen2_vl_dir, case):
    path, hf = tiny_qwen2_vl_dir
    model = load_hf(path)
    ids, mask, media = _inputs(case)
    ref = _hf_logits(hf, ids, mask, **media)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask, **media))
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ref).max() > 0.1


def test_rope_index_matches_hf_with_several_items_and_padding(tiny_qwen2_vl_dir):
    path, hf = tiny_qwen2_vl_dir
    model = load_hf(path)
    image_grids = [(1, 4, 6), (1, 6, 4), (1, 2, 2)]
    video_grids = [(2, 4, 6)]
    rows = [
        [1, 2] + _media_run(IMAGE, image_grids[0]) + [3] + _media_run(VIDEO, video_grids[0]) + [4, 5],
        [6] + _media_run(IMAGE, image_grids[1]) + [7, 8] + _media_run(IMAGE, image_grids[2]) + [9],
        [10, 11, 12],
    ]
    ids, mask = _left_pad(rows)
    mm = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    ref, _ = hf.model.get_rope_index(torch.tensor(ids), torch.tensor(mm), torch.tensor(image_grids),
                                     torch.tensor(video_grids), torch.tensor(mask))
    ours = mrope_positions(ids, mask, image_grids, video_grids, model.config)
    np.testing.assert_array_equal(ours, ref.numpy())
    assert (ours[1] != ours[2]).any()  # height and width rows really differ


def test_transformers5_key_names_load_the_same(tiny_qwen2_vl_dir, tmp_path):
    path, _ = tiny_qwen2_vl_dir
    tensors = load_file(os.path.join(path, "model.safetensors"))
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
    assert any(k.startswith("model.language_model.layers.") for k in renamed)
    out = tmp_path / "v5"
    out.mkdir()
    save_file(renamed, str(out / "model.safetensors"))
    (out / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    ids, mask, media = _inputs("image")
    np.testing.assert_array_equal(np.asarray(load_hf(str(out))(input_ids=ids, attention_mask=mask, **media)),
                                  np.asarray(load_hf(path)(input_ids=ids, attention_mask=mask, **media)))


def test_lora_on_language_model_only_and_peft_export(tiny_qwen2_vl_dir, tmp_path):
    import peft

    path, hf = tiny_qwen2_vl_dir
    model = load_hf(path)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(0))
    names = [n for p, linear in lora.lora_layers(model) for n in layer_paths(p, linear.kernel)]
    assert len(names) == 14 and all(n.startswith("language_model.model.layers.") for n in names)
    for i, (_, linear) in enumerate(lora.lora_layers(model)):
        linear.lora.lora_b[...] = 0.05 * np.random.RandomState(i).randn(*linear.lora.lora_b[...].shape)
    ids, mask, media = _inputs("video+text")
    ours = np.asarray(model(input_ids=ids, attention_mask=mask, **media))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), lora.export_peft(model, str(tmp_path / "a")))
    ref = _hf_logits(peft_model.eval(), ids, mask, **media)
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ours - _hf_logits(hf, ids, mask, **media))[valid].max() > 1e-3


def padded_video(packed: list[np.ndarray], grids, frames: int, patches: int) -> np.ndarray:
    """Clips' packed patches [t*h*w, D] -> the pipeline's padded layout [B, frames, patches, D]."""
    out = np.zeros((len(packed), frames, patches, packed[0].shape[-1]), np.float32)
    for i, (p, (t, h, w)) in enumerate(zip(packed, grids)):
        out[i, :t, :h * w] = p.reshape(t, h * w, -1)
    return out


@nnx.jit
def _padded_logits(model, ids, mask, pixels, grids, positions):
    return model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=grids,
                 position_ids=positions)


def test_a_mixed_grid_batch_equals_hf_clip_by_clip(tiny_qwen2_vl_dir):
    """Clips of different frame sizes and lengths in one padded batch (the input pipeline's layout, the
    grids traced under jit): every clip's logits equal HF's on that clip alone, to 1e-4 (float32)."""
    path, hf = tiny_qwen2_vl_dir
    model = load_hf(path)
    rng = np.random.RandomState(3)
    clips = [preprocess_video(_frames(rng, 4, 60, 90)), preprocess_video(_frames(rng, 6, 90, 60)),
             preprocess_video(_frames(rng, 2, 56, 56))]
    grids = [g for _, g in clips]
    assert len(set(grids)) == 3  # (2, 4, 6), (3, 6, 4), (1, 4, 4)
    rows = [[5, 6] + _media_run(VIDEO, g) + [7, 8, 9 + i] for i, g in enumerate(grids)]
    ids, mask = _left_pad(rows)
    positions = mrope_positions(ids, mask, (), grids, model.config)
    pixels = padded_video([p for p, _ in clips], grids, frames=4, patches=32)  # buckets larger than every clip
    ours = np.asarray(_padded_logits(model, ids, mask, pixels, np.asarray(grids, np.int32), positions))
    for i, ((p, g), row) in enumerate(zip(clips, rows)):
        alone = _hf_logits(hf, np.asarray([row]), np.ones((1, len(row)), np.int64), pixel_values_videos=p,
                           video_grid_thw=np.array([g]))[0]
        np.testing.assert_allclose(ours[i][mask[i].astype(bool)], alone, atol=1e-4, err_msg=str(g))
    assert np.abs(alone).max() > 0.1
