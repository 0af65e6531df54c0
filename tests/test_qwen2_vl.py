"""Qwen2-VL: preprocessing vs transformers, configs, full-size shapes, sharding, scoring, prompts, bad input."""
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec

from data_pipelines import vision
from distill_jax import prompts, sharding
from distill_jax.convert import load_hf
from distill_jax.decoding import score_choices
from distill_jax.models.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from distill_jax.toy_tokenizer import make_qwen2_tokenizer

# Qwen2-VL-7B-Instruct's published config.json (flat text keys, rope_scaling of type "mrope").
PUBLISHED_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


def _hf_image_processor():
    return transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil()


@pytest.mark.parametrize("size", [(60, 80), (97, 131), (33, 500), (448, 252), (1000, 1400)])
def test_image_preprocessing_equals_hf(size):
    image = np.random.RandomState(sum(size)).randint(0, 256, size + (3,), dtype=np.uint8)
    ref = _hf_image_processor()(images=[image], return_tensors="np")
    pixels, grid = vision.preprocess_image(image)
    assert grid == tuple(ref["image_grid_thw"][0])
    assert np.abs(pixels - ref["pixel_values"]).max() == 0.0
    h, w = vision.smart_resize(*size)
    assert (h % 28, w % 28) == (0, 0) and 56 * 56 <= h * w <= 28 * 28 * 1280
    assert vision.num_vision_tokens(grid) == grid[1] * grid[2] // 4


def test_video_patchify_is_the_image_path_on_frame_pairs():
    frames = np.random.RandomState(0).randint(0, 256, (4, 70, 110, 3), dtype=np.uint8)
    pixels, grid = vision.preprocess_video(frames)
    assert grid == (2, 2 * 2, 4 * 2)
    rows = pixels.reshape(2, -1, 3, 2, 14, 14)  # [t, h*w, C, T, P, P]
    for i, frame in enumerate(frames):
        ref = _hf_image_processor()(images=[frame], return_tensors="np")["pixel_values"]
        expected = ref.reshape(-1, 3, 2, 14, 14)[:, :, 0]  # the image path repeats the frame on T
        np.testing.assert_array_equal(rows[i // 2, :, :, i % 2], expected)


def test_frame_sampling_at_fps():
    assert list(vision.sample_frame_indices(250, 25.0)) == list(np.round(np.linspace(0, 249, 20)).astype(int))
    assert len(vision.sample_frame_indices(3, 30.0)) == 2  # at least one temporal patch
    frames = np.zeros((250, 56, 56, 3), np.uint8)
    _, grid = vision.preprocess_video(frames, source_fps=25.0)
    assert grid == (10, 4, 4)  # 10 s at 2 fps = 20 frames = 10 temporal patches


def test_bad_frames_are_errors():
    with pytest.raises(ValueError, match=r"no frames \(T = 0\)"):
        vision.preprocess_video(np.zeros((0, 56, 56, 3), np.uint8))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels, got 4"):
        vision.preprocess_video(np.zeros((2, 56, 56, 4), np.uint8))
    with pytest.raises(ValueError, match="smaller than the 28-pixel minimum"):
        vision.preprocess_image(np.zeros((20, 300, 3), np.uint8))
    with pytest.raises(ValueError, match="not a multiple of temporal_patch_size"):
        vision.preprocess_video(np.zeros((3, 56, 56, 3), np.uint8))
    with pytest.raises(ValueError, match="0 decoded frames"):
        vision.sample_frame_indices(0, 25.0)


def test_published_config_is_the_7b_preset():
    assert Qwen2VLConfig.from_hf(PUBLISHED_7B) == Qwen2VLConfig.preset("7b")


def test_7b_parameter_count_equals_hf():
    config = Qwen2VLConfig.preset("7b")
    model = nnx.eval_shape(lambda: Qwen2VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        hf = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(**PUBLISHED_7B))
    assert ours == sum(p.numel() for p in hf.parameters()) == 8_291_375_616  # "8.3B"


def _video_batch(seed=0):
    rng = np.random.RandomState(seed)
    pixels, grid = vision.preprocess_video(rng.randint(0, 256, (4, 60, 90, 3), dtype=np.uint8))
    rows = [[5, 292] + [291] * vision.num_vision_tokens(grid) + [293, 7, 8], [9, 10, 11]]
    ids, mask = prompts.left_pad(rows, pad_id=0)
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=np.array([grid]))


def test_sharded_forward_and_score_choices(tiny_qwen2_vl_dir):
    path, _ = tiny_qwen2_vl_dir
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    plain, sharded = load_hf(path), load_hf(path, mesh=mesh)
    assert sharded.visual.blocks.mlp.fc1.kernel[...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    batch = _video_batch()
    expected = np.asarray(plain(**batch))
    letters = list(range(20, 30))
    with jax.set_mesh(mesh):
        scores = np.asarray(score_choices(sharded, batch, letters))
    np.testing.assert_allclose(scores, expected[:, -1, letters], atol=1e-5)


# Qwen2-VL-7B-Instruct's chat template (its tokenizer_config.json).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("kind", ["video", "image"])
def test_prompt_ids_equal_the_chat_template_and_processor_expansion(tmp_path, kind):
    from types import SimpleNamespace

    tokenizer = prompts.load_tokenizer(make_qwen2_tokenizer(str(tmp_path / "tok")))
    question = prompts.format_question(["dog", "cat", "car", "rain", "piano", "bird", "siren", "clap", "boom", "drum"])
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    rendered = tokenizer.apply_chat_template(messages, chat_template=QWEN2_VL_TEMPLATE, add_generation_prompt=True,
                                             tokenize=False)
    assert rendered == prompts.qwen2_vl_prompt(question, num_vision_tokens=1, kind=kind)
    grid = (10, 32, 32) if kind == "video" else (1, 34, 46)  # 20 frames at 448x448; a 476x644 image
    # Qwen2VLProcessor's own expansion of the pad token (its replace_* methods), on the rendered text.
    fake = SimpleNamespace(video_token=prompts.VIDEO_TOKEN, image_token=prompts.IMAGE_TOKEN,
                           video_processor=SimpleNamespace(merge_size=2), image_processor=SimpleNamespace(merge_size=2))
    replace = transformers.Qwen2VLProcessor.replace_video_token if kind == "video" else \
        transformers.Qwen2VLProcessor.replace_image_token
    expanded = replace(fake, {f"{kind}_grid_thw": np.array([grid])}, 0)
    pad = prompts.VIDEO_TOKEN if kind == "video" else prompts.IMAGE_TOKEN
    ref = tokenizer(rendered.replace(pad, expanded), add_special_tokens=False)["input_ids"]
    ours = prompts.encode_qwen2_vl(tokenizer, question, vision.num_vision_tokens(grid), kind=kind)
    assert ours == list(ref) and ours.count(tokenizer.convert_tokens_to_ids(pad)) == np.prod(grid) // 4


def test_vision_token_count_mismatch_is_an_error(tiny_qwen2_vl_dir):
    path, _ = tiny_qwen2_vl_dir
    model = load_hf(path)
    batch = _video_batch()
    batch["input_ids"][0, 2] = 5  # one <|video_pad|> fewer than the grid gives
    with pytest.raises(ValueError, match=r"a run of 11 vision tokens but its grid \(2, 4, 6\) gives 12"):
        model(**batch)  # caught while deriving the M-RoPE positions
    positions = np.zeros((3,) + batch["input_ids"].shape, np.int64)
    with pytest.raises(ValueError, match=r"hold 11 vision tokens \(id 291\) but the grids \(\(2, 4, 6\),\) give 12"):
        model(**batch, position_ids=positions)  # caught where the embeddings are merged
