"""Qwen2-Audio: configs, full-size shapes, sharding, and the whole chain from waveform to letter logits."""
import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec

from data_pipelines.audio import batch_log_mel_features, num_audio_tokens
from distill_jax import prompts, sharding
from distill_jax.convert import load_hf
from distill_jax.decoding import score_choices
from distill_jax.models.qwen2_audio import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration,
                                            short_clip_frames)
from distill_jax.toy_tokenizer import make_qwen2_tokenizer

# Qwen2-Audio-7B-Instruct's published config.json (text_config omits hidden size and layer counts).
PUBLISHED_7B = {
    "architectures": ["Qwen2AudioForConditionalGeneration"],
    "audio_config": {"activation_dropout": 0.0, "activation_function": "gelu", "attention_dropout": 0.0,
                     "d_model": 1280, "dropout": 0.0, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                     "encoder_layerdrop": 0.0, "encoder_layers": 32, "init_std": 0.02,
                     "max_source_positions": 1500, "model_type": "qwen2_audio_encoder", "num_hidden_layers": 32,
                     "num_mel_bins": 128, "scale_embedding": False},
    "audio_token_index": 151646, "model_type": "qwen2_audio",
    "text_config": {"bos_token_id": 151643, "eos_token_id": 151645, "intermediate_size": 11008,
                    "max_position_embeddings": 8192, "model_type": "qwen2", "rms_norm_eps": 1e-05,
                    "torch_dtype": "bfloat16", "use_mrope": False, "vocab_size": 156032},
    "torch_dtype": "bfloat16",
}


def test_published_config_is_the_7b_preset():
    assert Qwen2AudioConfig.from_hf(PUBLISHED_7B) == Qwen2AudioConfig.preset("7b")


def test_7b_parameter_count_equals_hf():
    config = Qwen2AudioConfig.preset("7b")
    model = nnx.eval_shape(lambda: Qwen2AudioForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        hf = transformers.Qwen2AudioForConditionalGeneration(transformers.Qwen2AudioConfig(**PUBLISHED_7B))
    assert ours == sum(p.numel() for p in hf.parameters()) == 8_397_094_912  # "8.4B"


def _audio_batch(seed=0, frames=(400, 180)):
    """Two clips of random 'log-mel' features and left-padded prompts with their <|AUDIO|> runs."""
    rng = np.random.RandomState(seed)
    features = rng.randn(2, 128, 3000).astype(np.float32)
    feature_mask = np.zeros((2, 3000), np.int64)
    for row, n in enumerate(frames):
        feature_mask[row, :n] = 1
    sequences = [[5, 6] + [290] * num_audio_tokens(n) + [7, 8, 9] for n in frames]
    ids, mask = prompts.left_pad(sequences, pad_id=0)
    return ids, mask, features, feature_mask


def test_sharded_forward_equals_unsharded(tiny_qwen2_audio_dir):
    path, _ = tiny_qwen2_audio_dir
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    plain, sharded = load_hf(path), load_hf(path, mesh=mesh)
    assert sharded.audio_tower.layers.fc1.kernel[...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    ids, mask, features, feature_mask = _audio_batch()
    window = short_clip_frames(feature_mask)
    inputs = dict(input_ids=ids, attention_mask=mask, input_features=features[..., :window],
                  feature_attention_mask=feature_mask[:, :window])
    expected = np.asarray(plain(**inputs))

    @nnx.jit
    def forward(model, inputs):
        return model(**inputs)

    with jax.set_mesh(mesh):
        out = forward(sharded, inputs)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_waveform_to_letter_logits_matches_hf_processor_and_model(tmp_path):
    """The whole chain: our log-mel + prompt + model == Qwen2AudioProcessor + HF model, at the answer position."""
    tokenizer = prompts.load_tokenizer(make_qwen2_tokenizer(str(tmp_path / "tok")))
    audio_id = tokenizer.convert_tokens_to_ids(prompts.AUDIO_TOKEN)
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                          d_model=32, max_source_positions=1500),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
        audio_token_index=audio_id)
    torch.manual_seed(1)
    hf = transformers.Qwen2AudioForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "model")
    model = load_hf(str(tmp_path / "model"))

    rng = np.random.RandomState(0)
    t = np.arange(16000 * 4) / 16000
    clips = [(0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32),  # 4 s sweep
             (0.1 * rng.randn(int(16000 * 2.5))).astype(np.float32)]  # 2.5 s noise
    options = ["dog barking", "cat meowing", "car engine", "rain", "piano", "bird song", "siren",
               "applause", "thunder", "drum"]
    question = prompts.format_question(options)
    letters = prompts.letter_token_ids(tokenizer)

    processor = transformers.Qwen2AudioProcessor(
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer)
    tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip"},
                                             {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    hf_inputs = processor(text=[text, text], audio=clips, sampling_rate=16000, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = hf(**{k: v for k, v in hf_inputs.items()}).logits[:, -1, letters].numpy()

    features, feature_mask = batch_log_mel_features(clips)
    sequences = [prompts.encode_qwen2_audio(tokenizer, question, num_audio_tokens(int(m.sum())))
                 for m in feature_mask]
    ids, mask = prompts.left_pad(sequences, pad_id=tokenizer.pad_token_id)
    np.testing.assert_array_equal(ids, hf_inputs["input_ids"].numpy())
    window = short_clip_frames(feature_mask)
    batch = dict(input_ids=ids, attention_mask=mask, input_features=features[..., :window],
                 feature_attention_mask=feature_mask[:, :window])
    ours = np.asarray(score_choices(model, batch, letters))
    # HF's own features come from its float32 torch path (<= 5.2e-5 from ours); the logits gap stays small.
    print(f"chain letter-logit max|diff| {np.abs(ours - ref).max():.2e}")
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
    assert ours.shape == (2, 10) and np.abs(ref).max() > 1e-2


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="activation_function must be 'gelu'"):
        Qwen2AudioConfig.from_hf({"audio_config": {"activation_function": "relu"}})
    with pytest.raises(ValueError, match="unknown Qwen2-Audio preset"):
        Qwen2AudioConfig.preset("13b")
    tiny = Qwen2AudioConfig.preset("tiny")
    with pytest.raises(ValueError, match="not divisible"):
        dataclasses.replace(tiny.audio, encoder_attention_heads=5)
