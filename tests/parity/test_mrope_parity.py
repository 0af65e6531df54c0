"""M-RoPE (3-row positions) vs Hugging Face's Qwen2VLRotaryEmbedding."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

from distill_jax.layers.rope import rope_angles, rope_cos_sin
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


def _positions(seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 50, (3, 2, 11))  # temporal, height, width rows differ


def test_mrope_cos_sin_match_hf():
    section = [2, 3, 3]  # head_dim 16 -> 8 frequencies
    hf_config = transformers.Qwen2VLTextConfig(
        hidden_size=64, num_attention_heads=4, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    rotary = Qwen2VLRotaryEmbedding(hf_config)
    positions = _positions()
    with torch.no_grad():
        cos_ref, sin_ref = rotary(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
    cos, sin = rope_cos_sin(rope_angles(jnp.asarray(positions), 16, 10000.0, section), jnp.float32)
    assert np.abs(np.asarray(cos) - cos_ref.numpy()).max() <= 1e-6
    assert np.abs(np.asarray(sin) - sin_ref.numpy()).max() <= 1e-6


def test_mrope_with_equal_rows_is_plain_rope():
    config = Qwen2Config.preset("tiny", mrope_section=(2, 3, 3))
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 11))
    positions = np.tile(np.arange(11), (2, 1))
    plain = np.asarray(model(input_ids=ids, position_ids=positions))
    three_rows = np.asarray(model(input_ids=ids, position_ids=np.stack([positions] * 3)))
    distinct = np.asarray(model(input_ids=ids, position_ids=_positions()))
    np.testing.assert_allclose(three_rows, plain, atol=1e-6)
    assert np.abs(distinct - plain).max() > 1e-3  # the rows do reach the attention


def test_mrope_positions_need_mrope_config():
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mrope_section"):
        model(input_ids=np.zeros((2, 11), np.int32), position_ids=_positions())
