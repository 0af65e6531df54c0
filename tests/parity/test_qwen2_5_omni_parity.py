"""Our Qwen2.5-Omni thinker (through the production converter) vs Hugging Face's, in float32.

Three conditions (audio only, silent video, sounded video with `use_audio_in_video`) plus
images; batches of clips of different lengths, left-padded; TMRoPE positions; greedy generate.
"""
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import OMNI_TOKENS as T
from data_pipelines.audio import num_audio_tokens
from distill_jax.convert import CheckpointMismatchError, load_hf, save_hf
from distill_jax.decoding import generate
from distill_jax.prompts import left_pad

PATCH_DIM = 3 * 2 * 14 * 14
SECONDS_PER_CHUNK, POSITIONS_PER_SECOND = 2, 25


def _left_pad(rows):
    """prompts.left_pad's ids and mask, as the int64 torch takes for input_ids."""
    return tuple(a.astype(np.int64) for a in left_pad(rows, pad_id=0))


def _sounded_run(grid, second_per_grid, frames):
    """<|vision_bos|><|audio_bos|>, then per 2 s chunk its video tokens and its audio tokens, then the eos pair
    (the processor's layout: a video token at time t*s_per_grid*25, the k-th audio token at k, chunks of 50)."""
    t, h, w = grid
    video_times = np.repeat(np.floor(np.arange(t) * second_per_grid * POSITIONS_PER_SECOND), h * w // 4)
    audio_times = np.arange(num_audio_tokens(frames))
    per_chunk = SECONDS_PER_CHUNK * POSITIONS_PER_SECOND
    chunks = int(max(video_times.max(), audio_times.max()) // per_chunk) + 1
    run = [T["vision_start"], T["audio_start"]]
    for k in range(chunks):
        run += [T["video"]] * int(np.sum(video_times // per_chunk == k))
        run += [T["audio"]] * int(np.sum(audio_times // per_chunk == k))
    return run + [T["audio_end"], T["vision_end"]]


def _audio(rng, frames, total):
    features = rng.randn(len(frames), 128, total).astype(np.float32)
    mask = np.zeros((len(frames), total), np.int64)
    for i, f in enumerate(frames):
        mask[i, :f] = 1
    return features, mask


GRIDS = np.array([[4, 4, 8], [2, 6, 4]])  # 2 and 1 vision windows per frame; 2 and 2 TMRoPE chunks
SECONDS_PER_GRID = np.array([1.0, 2.0])
FRAMES = [230, 120]  # 57 and 30 audio tokens: the first clip's audio spans two chunks


def _inputs(case, seed=0):
    rng = np.random.RandomState(seed)
    pixels = rng.randn(int(np.prod(GRIDS, axis=1).sum()), PATCH_DIM).astype(np.float32)
    video = dict(pixel_values_videos=pixels, video_grid_thw=GRIDS, video_second_per_grid=SECONDS_PER_GRID)
    if case == "sounded_video":
        features, mask = _audio(rng, FRAMES, 240)
        rows = [[5, 6] + _sounded_run(g, s, f) + [7, 8, 9] for g, s, f in zip(GRIDS, SECONDS_PER_GRID, FRAMES)]
        return (*_left_pad(rows), dict(video, input_features=features, feature_attention_mask=mask,
                                      use_audio_in_video=True))
    if case == "silent_video":
        rows = [[5, 6, T["vision_start"]] + [T["video"]] * int(np.prod(g) // 4) + [T["vision_end"], 7, 8]
                for g in GRIDS]
        return (*_left_pad(rows), video)
    if case == "audio":
        frames = [50, 37]  # 4 and 3 windows of 16 frames
        features, mask = _audio(rng, frames, 64)
        rows = [[5, 6, T["audio_start"]] + [T["audio"]] * int(num_audio_tokens(f)) + [T["audio_end"], 7, 8]
                for f in frames]
        return (*_left_pad(rows), dict(input_features=features, feature_attention_mask=mask))
    grid = np.array([[1, 6, 8]])
    rows = [[5, T["vision_start"]] + [T["image"]] * 12 + [T["vision_end"], 9], [10, 11, 12]]
    return (*_left_pad(rows), dict(pixel_values=rng.randn(48, PATCH_DIM).astype(np.float32), image_grid_thw=grid))


def _torch(media):
    out = {}
    for k, v in media.items():
        dtype = torch.float32 if k == "video_second_per_grid" else None
        out[k] = torch.tensor(v, dtype=dtype) if isinstance(v, np.ndarray) else v
    return out


def _hf_logits(hf, ids, mask, media):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **_torch(media)).logits.numpy()


@nnx.jit(static_argnums=2)
def _jitted_logits(model, arrays, static_items):
    return model(**arrays, **dict(static_items))


@pytest.mark.parametrize("case", ["sounded_video", "silent_video", "audio", "image"])
def test_logits_match_hf(tiny_qwen2_5_omni_dir, case):
    path, hf = tiny_qwen2_5_omni_dir
    model = load_hf(path)
    ids, mask, media = _inputs(case)
    ref = _hf_logits(hf, ids, mask, media)
    # Jitted through prepare_inputs (host-side positions, static grids): 5x quicker to run here than
    # eagerly. The eager public call is checked on sounded video by tests/test_main.py's audio-visual
    # teacher test (a scored clip against `model(input_ids=, ..., use_audio_in_video=True)`).
    arrays, static = model.prepare_inputs(dict(input_ids=ids, attention_mask=mask, **media))
    ours = np.asarray(_jitted_logits(model, arrays, tuple(sorted(static.items()))))
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(ref).max() > 0.1


def test_tmrope_positions_match_hf_get_rope_index(tiny_qwen2_5_omni_dir):
    path, hf = tiny_qwen2_5_omni_dir
    model = load_hf(path)
    ids, mask, media = _inputs("sounded_video")
    frames = media["feature_attention_mask"].sum(axis=1)
    for use_audio in (True, False):
        if not use_audio:  # the same clips as silent video
            ids, mask, _ = _inputs("silent_video")
        ref, ref_delta = hf.model.get_rope_index(
            torch.tensor(ids), None, torch.tensor(GRIDS), torch.tensor(mask), use_audio, torch.tensor(frames),
            torch.tensor(SECONDS_PER_GRID, dtype=torch.float32))
        ours, delta = model.positions(ids, mask, media["feature_attention_mask"], None, GRIDS, SECONDS_PER_GRID,
                                      use_audio)
        np.testing.assert_array_equal(ours, ref.numpy())
        np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))
    # Audio and video tokens of a sounded clip share time: both chunks start at the same position.
    assert ours.shape[0] == 3


def test_greedy_generate_on_sounded_video_equals_hf(tiny_qwen2_5_omni_dir):
    path, hf = tiny_qwen2_5_omni_dir
    model = load_hf(path)
    ids, mask, media = _inputs("sounded_video")
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=8, min_new_tokens=8, **_torch(media)).numpy()[:, ids.shape[1]:]
    ours = np.asarray(generate(model, ids, mask, 8, **media))
    np.testing.assert_array_equal(ours, ref)


def test_full_omni_checkpoint_loads_its_thinker_and_reports_the_skipped_speech_decoder(
        tiny_qwen2_5_omni_dir, tiny_qwen2_5_omni_full_dir, caplog):
    path, _ = tiny_qwen2_5_omni_dir
    ids, mask, media = _inputs("audio")
    with caplog.at_level("WARNING", logger="distill_jax.convert"):
        full = load_hf(tiny_qwen2_5_omni_full_dir)
    report = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 17 tensors of the talker" in report and "skipped 122 tensors of token2wav" in report
    arrays, static = full.prepare_inputs(dict(input_ids=ids, attention_mask=mask, **media))
    static = tuple(sorted(static.items()))
    np.testing.assert_array_equal(np.asarray(_jitted_logits(full, arrays, static)),
                                  np.asarray(_jitted_logits(load_hf(path), arrays, static)))


def test_save_hf_round_trips_through_transformers(tiny_qwen2_5_omni_dir, tmp_path):
    import transformers

    path, hf = tiny_qwen2_5_omni_dir
    ids, mask, media = _inputs("sounded_video")
    out = save_hf(load_hf(path), str(tmp_path / "saved"))
    reloaded = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out).eval()
    np.testing.assert_array_equal(_hf_logits(reloaded, ids, mask, media), _hf_logits(hf, ids, mask, media))


def test_bad_inputs_and_unknown_keys_are_named(tiny_qwen2_5_omni_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = tiny_qwen2_5_omni_dir
    model = load_hf(path)
    ids, mask, media = _inputs("sounded_video")
    short = ids.copy()
    short[0, np.flatnonzero(short[0] == T["audio"])[-1]] = 7  # one audio token fewer than the features give
    with pytest.raises(ValueError, match=r"hold 86 <\|AUDIO\|> tokens .* gives 87 audio embeddings"):
        model(input_ids=short, attention_mask=mask, **media)

    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["visual.blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): visual\.blocks\.0\.attn\.qkv\.weight"):
        load_hf(str(bad))


@nnx.jit
def _padded_logits(model, arrays):
    return model(**arrays)


@pytest.mark.parametrize("case", ["sounded_video", "silent_video"])
def test_a_mixed_grid_batch_padded_per_clip_equals_hf_clip_by_clip(tiny_qwen2_5_omni_dir, case):
    """The two clips (different grids and window counts) as the input pipeline pads them, [B, frames,
    patches, D] with traced grids: each clip's logits equal HF's on that clip alone (1e-4, float32)."""
    path, hf = tiny_qwen2_5_omni_dir
    model = load_hf(path)
    ids, mask, media = _inputs(case)
    positions = model.positions(ids, mask, media.get("feature_attention_mask"), None, GRIDS, SECONDS_PER_GRID,
                                case == "sounded_video")[0]
    sizes = np.prod(GRIDS, axis=1)
    packed = np.split(media["pixel_values_videos"], np.cumsum(sizes)[:-1])
    pixels = np.zeros((len(GRIDS), 5, 40, PATCH_DIM), np.float32)  # buckets larger than both clips
    for i, (p, (t, h, w)) in enumerate(zip(packed, GRIDS)):
        pixels[i, :t, :h * w] = p.reshape(t, h * w, -1)
    arrays = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels,
                  video_grid_thw=GRIDS.astype(np.int32), position_ids=positions)
    if case == "sounded_video":
        arrays.update(input_features=media["input_features"], feature_attention_mask=media["feature_attention_mask"])
    ours = np.asarray(_padded_logits(model, arrays))
    for i in range(len(GRIDS)):
        real = mask[i].astype(bool)
        alone = {**{k: v[i:i + 1] for k, v in media.items() if k in ("input_features", "feature_attention_mask",
                                                                      "video_grid_thw", "video_second_per_grid")},
                 "pixel_values_videos": packed[i]}
        if case == "sounded_video":
            alone["use_audio_in_video"] = True
        ref = _hf_logits(hf, ids[i:i + 1, real], np.ones((1, real.sum()), np.int64), alone)[0]
        assert np.abs(ours[i][real] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
