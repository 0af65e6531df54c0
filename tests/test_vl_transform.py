"""Qwen2VLTransform in the Grain pipeline: preprocessing and prompt ids per clip, and batches the model scores."""
import pickle

import numpy as np
import pytest
from flax import nnx

from data_pipelines import media, tfrecord, vision
from data_pipelines.pipeline import PipelineConfig, make_dataset
from data_pipelines.questions import QuestionMaker
from data_pipelines.transforms import Qwen2VLTransform, VideoBuckets, qwen2_vl_model_inputs
from distill_jax import prompts
from distill_jax.decoding import score_choices
from distill_jax.models.qwen2 import Qwen2Config
from distill_jax.models.qwen2_vl import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLVisionConfig,
                                         mrope_positions)
from distill_jax.toy_tokenizer import make_qwen2_tokenizer

CLASSES = [f"class {i:02d}" for i in range(12)]


# Per clip (frame height, width, frames at 4 fps): mixed aspect ratios, sizes and lengths, as real clips come.
SHAPES = [(60, 90, 8), (90, 60, 8), (56, 56, 4), (84, 150, 12), (60, 90, 2), (112, 84, 8)]


def _frames(i):
    rng = np.random.RandomState(i)
    height, width, count = SHAPES[i]
    return [rng.randint(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    with tfrecord.TFRecordWriter(root / "clips.tfrecord") as writer:
        for i in range(6):
            jpegs = tuple(media.encode_jpeg(f) for f in _frames(i))
            writer.write(tfrecord.clip_to_example(tfrecord.Clip(
                clip_id=f"clip{i:03d}", start_sec=0.0, label_index=i, label_name=CLASSES[i],
                pcm16=np.zeros(3200, np.int16), sample_rate=16000, jpeg_frames=jpegs, fps=4.0, split="test")))
    return str(root / "clips.tfrecord"), make_qwen2_tokenizer(str(root / "tok"))


FRAME_BUCKETS, PATCH_BUCKETS = (2, 4), (16, 24, 64)


def test_transform_matches_preprocessing_and_prompt_and_batches_score(setup):
    """Clips of mixed frame sizes and lengths: each keeps its own smart_resize and length; a batch
    is padded to its smallest (temporal patches, patches) bucket pair, its prompts to the length
    the pair implies, and each row scores as that clip alone through the model's packed call."""
    path, tokenizer_dir = setup
    transform = pickle.loads(pickle.dumps(Qwen2VLTransform(tokenizer_dir)))
    text = transform.text_tokens(CLASSES, 10)
    video = VideoBuckets(FRAME_BUCKETS, PATCH_BUCKETS, text)
    config = PipelineConfig(batch_size=3, shuffle=False, drop_remainder=False, decode_audio=False, read_threads=1)
    it = iter(make_dataset([path], CLASSES, config=config, transform=transform,
                           padding=transform.padding(video=video), process_index=0, process_count=1))
    batches = list(it)
    it.close()
    tok = prompts.load_tokenizer(tokenizer_dir)
    grids = {}
    for batch in batches:
        frames, patches = batch["pixel_values_videos"].shape[1:3]
        for row, cid in enumerate(batch["clip_id"]):
            i = int(cid[4:])
            decoded = np.stack([media.decode_jpeg(media.encode_jpeg(f)) for f in _frames(i)])
            pixels, grid = vision.preprocess_video(decoded, source_fps=4.0)
            grids[i] = grid
            t, h, w = grid
            assert tuple(batch["video_grid_thw"][row]) == grid
            np.testing.assert_array_equal(batch["pixel_values_videos"][row, :t, :h * w], pixels.reshape(t, h * w, -1))
            assert not batch["pixel_values_videos"][row, t:].any() and not batch["pixel_values_videos"][row, :, h * w:].any()
            question = QuestionMaker(CLASSES)(cid, CLASSES[i])
            ids = prompts.encode_qwen2_vl(tok, question.text(), vision.num_vision_tokens(grid), kind="video")
            np.testing.assert_array_equal(batch["input_ids"][row, -len(ids):], ids)
            assert batch["answer"][row] == question.answer
            assert len(ids) - vision.num_vision_tokens(grid) <= text  # the measured text budget holds
        # the smallest bucket pair that holds the batch, and the prompt length it implies
        used = [grids[int(c[4:])] for c in batch["clip_id"]]
        assert frames == min(b for b in FRAME_BUCKETS if b >= max(g[0] for g in used))
        assert patches == min(b for b in PATCH_BUCKETS if b >= max(g[1] * g[2] for g in used))
        assert batch["input_ids"].shape[1] == -(-(text + frames * patches // 4) // 8) * 8
    assert len(set(grids.values())) == 6  # six clips, six different grids
    batch = batches[0]

    video_id = tok.convert_tokens_to_ids(prompts.VIDEO_TOKEN)
    config = Qwen2VLConfig(
        vision=Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4),
        text=Qwen2Config.preset("tiny", vocab_size=len(tok), mrope_section=(2, 3, 3)),
        image_token_id=tok.convert_tokens_to_ids(prompts.IMAGE_TOKEN), video_token_id=video_id,
        vision_start_token_id=tok.convert_tokens_to_ids(prompts.VISION_START),
        vision_end_token_id=tok.convert_tokens_to_ids(prompts.VISION_END))
    model = Qwen2VLForConditionalGeneration(config, rngs=nnx.Rngs(0))
    # The pipeline's M-RoPE positions (per clip, left-padded) = the model's over the padded batch.
    grids = tuple(tuple(int(v) for v in g) for g in batch["video_grid_thw"])
    assert len(set(grids)) == len(grids)
    np.testing.assert_array_equal(batch["position_ids"].transpose(2, 0, 1),
                                  mrope_positions(batch["input_ids"], batch["attention_mask"], (), grids, config))
    letters = prompts.letter_token_ids(tok)
    scores = np.asarray(score_choices(model, qwen2_vl_model_inputs(batch), letters))
    for row, (t, h, w) in enumerate(grids):  # each row of the padded batch scores as that clip alone, packed
        real = batch["attention_mask"][row].astype(bool)
        alone = np.asarray(score_choices(model, {
            "input_ids": batch["input_ids"][row][real][None], "attention_mask": np.ones((1, real.sum()), np.int32),
            "pixel_values_videos": batch["pixel_values_videos"][row, :t, :h * w].reshape(-1, 1176),
            "video_grid_thw": np.asarray([(t, h, w)])}, letters))
        np.testing.assert_allclose(scores[row], alone[0], atol=1e-5)


def test_a_clip_larger_than_every_bucket_is_named(setup):
    path, tokenizer_dir = setup
    transform = Qwen2VLTransform(tokenizer_dir)
    config = PipelineConfig(batch_size=2, shuffle=False, drop_remainder=False, decode_audio=False, read_threads=1)
    video = VideoBuckets(FRAME_BUCKETS, (16,), transform.text_tokens(CLASSES, 10))
    it = iter(make_dataset([path], CLASSES, config=config, transform=transform, padding=transform.padding(video=video),
                           process_index=0, process_count=1))
    with pytest.raises(ValueError, match=r"clip clip00\d: 'pixel_values_videos' has 24 rows per item on axis 1, "
                                         r"over the largest bucket 16"):
        next(it)


def test_video_prompts_rounded_to_the_flash_block(setup):
    """VideoBuckets(multiple=128) (configs/paper.py): every batch's prompt is the length its bucket pair
    implies rounded up to 128, a length the TPU flash kernel takes; the clip's ids end it unchanged."""
    path, tokenizer_dir = setup
    transform = Qwen2VLTransform(tokenizer_dir)
    text = transform.text_tokens(CLASSES, 10)
    rounded, plain = ({"video": VideoBuckets(FRAME_BUCKETS, PATCH_BUCKETS, text, multiple=m)} for m in (128, 8))
    config = PipelineConfig(batch_size=3, shuffle=False, drop_remainder=False, decode_audio=False, read_threads=1)
    runs = []
    for video in (rounded, plain):
        it = iter(make_dataset([path], CLASSES, config=config, transform=transform,
                               padding=transform.padding(**video), process_index=0, process_count=1))
        runs.append(list(it))
        it.close()
    for a, b in zip(*runs):
        frames, patches = a["pixel_values_videos"].shape[1:3]
        assert a["input_ids"].shape[1] == -(-(text + frames * patches // 4) // 128) * 128
        assert a["input_ids"].shape[1] > b["input_ids"].shape[1]
        np.testing.assert_array_equal(a["input_ids"][:, -b["input_ids"].shape[1]:], b["input_ids"])
        np.testing.assert_array_equal(a["position_ids"][:, -b["position_ids"].shape[1]:], b["position_ids"])
        assert a["attention_mask"].sum() == b["attention_mask"].sum()
