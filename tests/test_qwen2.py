"""Qwen2 config handling, full-size shapes, and the KV cache."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, init_cache

# Qwen2-Audio-7B-Instruct's published text_config: no hidden_size, no layer/head counts.
QWEN2_AUDIO_TEXT_CONFIG = {
    "bos_token_id": 151643, "eos_token_id": 151645, "intermediate_size": 11008,
    "max_position_embeddings": 8192, "model_type": "qwen2", "rms_norm_eps": 1e-05,
    "torch_dtype": "bfloat16", "use_mrope": False, "vocab_size": 156032,
}


def test_7b_parameter_count_from_eval_shape():
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(Qwen2Config.preset("7b"), rngs=nnx.Rngs(0)))
    shapes = jax.tree.leaves(nnx.state(model, nnx.Param))
    # Qwen2-7B's published size (hidden 3584, 28 layers, 28 heads, 4 kv heads, intermediate 18944).
    assert sum(int(np.prod(p.shape)) for p in shapes) == 7_615_616_512
    q = model.model.layers.self_attn.q_proj.kernel  # the 28 layers stacked for the scan
    k = model.model.layers.self_attn.k_proj.kernel
    assert q.shape == (28, 3584, 3584) and k.shape == (28, 3584, 512)


def test_from_hf_fills_hf_defaults_like_transformers():
    ours = Qwen2Config.from_hf(QWEN2_AUDIO_TEXT_CONFIG)
    theirs = transformers.Qwen2Config(**QWEN2_AUDIO_TEXT_CONFIG)
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads) == \
        (theirs.hidden_size, theirs.num_hidden_layers, theirs.num_attention_heads,
         theirs.num_key_value_heads) == (4096, 32, 32, 32)
    assert ours.intermediate_size == 11008 and ours.vocab_size == 156032
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rms_norm_eps == 1e-5 and not ours.tie_word_embeddings


def test_to_hf_round_trips_through_transformers():
    ours = Qwen2Config.preset("7b", tie_word_embeddings=True, eos_token_id=7)
    hf = transformers.Qwen2Config(**{k: v for k, v in ours.to_hf().items() if k != "model_type"})
    again = Qwen2Config.from_hf(hf.to_dict())
    assert again == ours


def test_from_hf_rejects_what_we_do_not_implement():
    with pytest.raises(NotImplementedError, match="sliding"):
        Qwen2Config.from_hf({**QWEN2_AUDIO_TEXT_CONFIG, "use_sliding_window": True})
    with pytest.raises(NotImplementedError, match="yarn"):
        Qwen2Config.from_hf({**QWEN2_AUDIO_TEXT_CONFIG, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Qwen2Config.preset("tiny", num_key_value_heads=3)


def test_kv_cache_chunks_equal_one_forward():
    config = Qwen2Config.preset("tiny")
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    ids = rng.randint(0, config.vocab_size, (2, 10))
    mask = np.ones((2, 10), bool)
    mask[1, :3] = False  # left padding
    full = np.asarray(model(input_ids=ids, attention_mask=mask))
    cache = init_cache(config, 2, 16)
    pieces = []
    for start, stop in [(0, 6), (6, 7), (7, 10)]:
        logits, cache = model.forward_cached(cache, ids[:, start:stop], mask[:, start:stop])
        pieces.append(np.asarray(logits))
    assert int(cache["index"]) == 10
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[mask], full[mask], atol=1e-5)


def test_bf16_compute_stays_close_to_float32():
    config = Qwen2Config.preset("tiny")
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    model16 = Qwen2ForCausalLM(dataclasses.replace(config, dtype="bfloat16"), rngs=nnx.Rngs(0))
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 8))
    out32 = np.asarray(model(input_ids=ids))
    out16 = model16(input_ids=ids)
    assert out16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out16, np.float32) - out32).max() < 0.05 * np.abs(out32).max() + 1e-2
