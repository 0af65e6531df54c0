"""Qwen2VLTransform in the Grain pipeline: preprocessing and prompt ids per clip, and batches the model scores."""
import pickle

import numpy as np
import pytest
from flax import nnx

from data_pipelines import media, tfrecord, vision
from data_pipelines.pipeline import PipelineConfig, make_dataset
from data_pipelines.questions import QuestionMaker
from data_pipelines.transforms import Qwen2VLTransform, qwen2_vl_model_inputs
from distill_jax import prompts
from distill_jax.decoding import score_choices
from distill_jax.models.qwen2 import Qwen2Config
from distill_jax.models.qwen2_vl import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLVisionConfig,
                                         mrope_positions)
from distill_jax.toy_tokenizer import make_qwen2_tokenizer

CLASSES = [f"class {i:02d}" for i in range(12)]


def _frames(i):
    rng = np.random.RandomState(i)
    return [rng.randint(0, 256, (60, 90, 3), dtype=np.uint8) for _ in range(8)]  # 2 s at 4 fps


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


def test_transform_matches_preprocessing_and_prompt_and_batches_score(setup):
    path, tokenizer_dir = setup
    transform = pickle.loads(pickle.dumps(Qwen2VLTransform(tokenizer_dir)))
    config = PipelineConfig(batch_size=4, shuffle=False, drop_remainder=False, decode_audio=False, read_threads=1)
    it = iter(make_dataset([path], CLASSES, config=config, transform=transform,
                           padding=transform.padding(buckets=(128, 256)), process_index=0, process_count=1))
    batches = list(it)
    it.close()
    tok = prompts.load_tokenizer(tokenizer_dir)
    batch = batches[0]
    for row, cid in enumerate(batch["clip_id"]):
        i = int(cid[4:])
        decoded = np.stack([media.decode_jpeg(media.encode_jpeg(f)) for f in _frames(i)])
        pixels, grid = vision.preprocess_video(decoded, source_fps=4.0)
        assert grid == (2, 4, 6) and tuple(batch["video_grid_thw"][row]) == grid  # 4 frames at 2 fps, 56x84 px
        np.testing.assert_array_equal(batch["pixel_values_videos"][row], pixels)
        question = QuestionMaker(CLASSES)(cid, CLASSES[i])
        ids = prompts.encode_qwen2_vl(tok, question.text(), vision.num_vision_tokens(grid), kind="video")
        np.testing.assert_array_equal(batch["input_ids"][row, -len(ids):], ids)
        assert batch["answer"][row] == question.answer

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
    np.testing.assert_array_equal(batch["position_ids"].transpose(2, 0, 1),
                                  mrope_positions(batch["input_ids"], batch["attention_mask"], (), grids, config))
    letters = prompts.letter_token_ids(tok)
    scores = np.asarray(score_choices(model, qwen2_vl_model_inputs(batch), letters))
    for row in range(2):  # each row of the packed batch scores as that clip alone
        single = {k: v[row:row + 1] for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                       "pixel_values_videos", "video_grid_thw",
                                                                       "position_ids")}
        alone = np.asarray(score_choices(model, qwen2_vl_model_inputs(single), letters))
        np.testing.assert_allclose(scores[row], alone[0], atol=1e-5)


def test_mixed_grids_in_a_batch_are_an_error():
    batch = {"input_ids": np.zeros((2, 3)), "attention_mask": np.ones((2, 3)),
             "pixel_values_videos": np.zeros((2, 4, 1176)), "video_grid_thw": np.array([[1, 2, 2], [2, 2, 1]])}
    with pytest.raises(ValueError, match="different video grids"):
        qwen2_vl_model_inputs(batch)
