"""Qwen2 decoder (= HF Qwen2ForCausalLM) in Flax NNX: the language model of Qwen2-Audio and Qwen2-VL.

Module and attribute names follow Hugging Face's (`model.layers.3.self_attn.q_proj`),
so the checkpoint key map is a rename of leaf names (`weight` -> `kernel`/`scale`/
`embedding`). Positions may be [B, T] (RoPE) or [3, B, T] (Qwen2-VL's M-RoPE).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from distill_jax.layers.attention import attention, causal_padding_mask, check_implementation
from distill_jax.layers.linear import Embed, Linear
from distill_jax.layers.norms import RMSNorm
from distill_jax.layers.rope import apply_rope, rope_angles, rope_cos_sin
from distill_jax.layers.scan import scan_layers, stack_layers
from distill_jax.sharding import constrain

# Hugging Face's Qwen2Config defaults: published configs omit keys that take them
# (Qwen2-Audio-7B's text_config has no hidden_size or layer counts).
_HF_DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
    max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_theta=10000.0, use_sliding_window=False,
)


# Rematerialisation of each decoder layer in training (jax.checkpoint policies): "none" keeps
# every activation the backward pass needs; "dots" keeps the matmul outputs and recomputes the
# cheap elementwise work; "full" keeps only each layer's input and recomputes the layer. With the
# layers scanned, "none" makes the scan store every intermediate of every layer, which unrolled XLA
# partly recomputed itself: at 7B on v5e-8, scanned "dots" needs what unrolled "none" did (13.9 GiB
# a chip) and scanned "none" does not fit (17.2 GiB of temporaries; benchmarks/README.md).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture of a Qwen2 decoder, plus the numerics we run it in (dtype, param_dtype)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    mrope_section: tuple[int, ...] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Not Hugging Face's: how we compute.
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None  # layers.attention.IMPLEMENTATIONS; None = chosen by backend
    remat: str = "none"  # REMAT_POLICIES: what the backward pass keeps of each decoder layer
    scan_layers: bool = True  # layers stacked and run by one lax.scan (layers.scan): one layer to compile

    def __post_init__(self):
        check_implementation(self.attention_impl)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; known: {sorted(REMAT_POLICIES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, defaults: dict[str, Any] | None = None, **overrides) -> "Qwen2Config":
        """From a Hugging Face config dict (a `config.json` or a `text_config`), HF defaults filled in.

        `defaults` replaces Qwen2Config's defaults where a family's text config has others
        (Qwen2VLTextConfig's differ).
        """
        d = {**_HF_DEFAULTS, **(defaults or {}),
             **{k: v for k, v in hf.items() if v is not None or k in ("head_dim",)}}
        if d.get("hidden_act") != "silu":
            raise ValueError(f"Qwen2 hidden_act must be 'silu', got {d.get('hidden_act')!r}")
        if d.get("use_sliding_window"):
            raise NotImplementedError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise NotImplementedError(f"rope_type {rope_type!r} is not supported (only default RoPE / M-RoPE)")
        eos = d.get("eos_token_id")
        kwargs = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"] or d["num_attention_heads"],
            head_dim=d.get("head_dim"), max_position_embeddings=d["max_position_embeddings"],
            rms_norm_eps=d["rms_norm_eps"], rope_theta=float(rope.get("rope_theta", d["rope_theta"])),
            mrope_section=rope.get("mrope_section"), tie_word_embeddings=d["tie_word_embeddings"],
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos, pad_token_id=d.get("pad_token_id"),
        )
        return cls(**{**kwargs, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """A dict `transformers.Qwen2Config(**d)` (or a Qwen2-VL text_config) accepts."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.mrope_section is not None:
            rope["mrope_section"] = list(self.mrope_section)
        d = dict(
            model_type="qwen2", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            hidden_act="silu", max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters=rope, use_sliding_window=False, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        return d

    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen2Config":
        """`tiny` (CPU tests, toy world) or `7b` (= Qwen2-7B / Qwen2-VL-7B's language model)."""
        presets = {
            "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
            "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1000000.0),
        }
        if name not in presets:
            raise ValueError(f"unknown Qwen2 preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


def init_cache(config: Qwen2Config, batch_size: int, max_length: int, dtype=None) -> dict:
    """An empty KV cache: k/v [B, S, K, H] per layer (one [L, B, S, K, H] pair when the layers are
    scanned), which slots hold real tokens, next slot."""
    dtype = dtype or config.dtype
    shape = (batch_size, max_length, config.num_key_value_heads, config.head_dim)
    if config.scan_layers:
        layers = {"k": jnp.zeros((config.num_hidden_layers, *shape), dtype),
                  "v": jnp.zeros((config.num_hidden_layers, *shape), dtype)}
    else:
        layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                  for _ in range(config.num_hidden_layers)]
    return {"index": jnp.zeros((), jnp.int32), "key_valid": jnp.zeros((batch_size, max_length), jnp.bool_),
            "layers": layers}


class Qwen2Attention(nnx.Module):
    """= Qwen2Attention: GQA with q/k/v bias, RoPE, no bias on o_proj."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_impl = config.attention_impl
        d, q, kv = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.q_proj = Linear(d, q, axes=("embed", "q_heads"), use_bias=True, **kw)
        self.k_proj = Linear(d, kv, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.v_proj = Linear(d, kv, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.o_proj = Linear(q, d, axes=("q_heads", "embed"), use_bias=False, **kw)

    def __call__(self, x, cos, sin, mask, layer_cache=None, cache_index=None, key_valid=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                                    cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                                    cache_index, axis=1)
            layer_cache = {"k": k, "v": v}
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=self.head_dim ** -0.5,
                        implementation=self.attention_impl, key_valid=key_valid)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), layer_cache


class Qwen2MLP(nnx.Module):
    """= Qwen2MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nnx.Module):
    """= Qwen2DecoderLayer: pre-norm attention and MLP with residuals."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        pd = jnp.dtype(config.param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.self_attn = Qwen2Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                                param_dtype=pd, rngs=rngs)
        self.mlp = Qwen2MLP(config, rngs=rngs)

    def __call__(self, x, cos, sin, mask, layer_cache=None, cache_index=None, key_valid=None):
        attn_out, layer_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache, cache_index,
                                               key_valid)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed")), layer_cache


def remat_layer(layer: Qwen2DecoderLayer, policy, x, cos, sin, mask, key_valid):
    """`layer(x)` under jax.checkpoint: its backward pass recomputes what `policy` does not save.

    A pure function of the layer's split state (nnx.remat would write the state back, which a
    module merged inside the train step's value_and_grad may not do).
    """
    graphdef, state = nnx.split(layer)

    def forward(state, x, cos, sin, mask, key_valid):
        return nnx.merge(graphdef, state)(x, cos, sin, mask, None, 0, key_valid)[0]

    return jax.checkpoint(forward, policy=policy)(state, x, cos, sin, mask, key_valid)


def default_position_ids(attention_mask: jax.Array, cache_key_valid: jax.Array | None = None) -> jax.Array:
    """Positions that skip left padding: the count of real tokens before each token (as HF generate)."""
    mask = attention_mask.astype(jnp.int32)
    before = 0 if cache_key_valid is None else jnp.sum(cache_key_valid, axis=1, keepdims=True)
    return jnp.maximum(before + jnp.cumsum(mask, axis=1) - 1, 0)


class Qwen2Model(nnx.Module):
    """= Qwen2Model: embeddings, decoder layers, final norm -> hidden states."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=jnp.dtype(config.dtype),
                                  param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        layers = [Qwen2DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        self.layers = stack_layers(layers) if config.scan_layers else nnx.List(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                            param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, *, inputs_embeds=None,
                 cache=None):
        """Hidden states [B, T, D] (and the updated cache when one is given)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.dtype)
        b, t, _ = x.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        attention_mask = attention_mask.astype(jnp.bool_)
        if cache is None:
            key_valid, index = attention_mask, 0
            if position_ids is None:
                position_ids = default_position_ids(attention_mask)
        else:
            index = cache["index"]
            if position_ids is None:
                position_ids = default_position_ids(attention_mask, cache["key_valid"])
                if "rope_delta" in cache:  # M-RoPE models: media runs shift the text positions after them
                    position_ids = position_ids + cache["rope_delta"][:, None]
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache["key_valid"], attention_mask, index, axis=1)
        mask = causal_padding_mask(key_valid, t, offset=index)
        cfg = self.config
        cos, sin = rope_cos_sin(rope_angles(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section),
                                x.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        if cfg.scan_layers:
            return self._scanned(x, cos, sin, mask, key_valid, cache, index, t)
        if cache is None and cfg.remat != "none":
            for layer in self.layers:
                x = remat_layer(layer, REMAT_POLICIES[cfg.remat], x, cos, sin, mask, key_valid)
            return self.norm(x)
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache["layers"][i]
            x, layer_cache = layer(x, cos, sin, mask, layer_cache, index, key_valid if cache is None else None)
            new_layers.append(layer_cache)
        x = self.norm(x)
        if cache is None:
            return x
        return x, {**cache, "index": index + t, "key_valid": key_valid, "layers": new_layers}

    def _scanned(self, x, cos, sin, mask, key_valid, cache, index, t):
        """The decoder layers as one scan; a cache's stacked k/v are scanned along with them."""
        cfg = self.config
        if cache is None:
            def body(layer, x, _):
                return layer(x, cos, sin, mask, None, 0, key_valid)[0], None

            x, _ = scan_layers(self.layers, body, x, remat=cfg.remat != "none",
                               remat_policy=REMAT_POLICIES[cfg.remat])
            return self.norm(x)

        def cached(layer, x, layer_cache):
            return layer(x, cos, sin, mask, layer_cache, index, None)

        x, new_layers = scan_layers(self.layers, cached, x, cache["layers"])
        return self.norm(x), {**cache, "index": index + t, "key_valid": key_valid, "layers": new_layers}


class Qwen2ForCausalLM(nnx.Module):
    """= Qwen2ForCausalLM: `model(input_ids=, attention_mask=, position_ids=None) -> logits [B, T, V]`."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.model = Qwen2Model(config, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, axes=("embed", "vocab"), dtype=jnp.dtype(config.dtype),
            param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, *, inputs_embeds=None):
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds)
        return self.logits(hidden)

    def hidden_states(self, input_ids=None, attention_mask=None, position_ids=None, *, inputs_embeds=None):
        """Final-norm hidden states [B, T, D] (what the LM head reads)."""
        return self.model(input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds)

    def forward_cached(self, cache, input_ids=None, attention_mask=None, position_ids=None, *,
                       inputs_embeds=None):
        """Logits of new tokens appended after the cache's content, and the updated cache."""
        hidden, cache = self.model(input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds,
                                   cache=cache)
        return self.logits(hidden), cache

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty KV cache for `forward_cached` (what `decoding.generate` asks every family for)."""
        return init_cache(self.config, batch_size, max_length)

    def lm_head_kernel(self) -> jax.Array:
        """The [D, V] output projection (the embedding table transposed when tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.dense_kernel()

    def logits(self, hidden: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        """Logits over the vocabulary, or over `token_ids` only (e.g. the letters A-J)."""
        if token_ids is not None:
            if self.lm_head is not None and self.lm_head.lora is not None and not self.lm_head.lora.merged:
                raise NotImplementedError("choice logits through an lm_head with an unmerged LoRA adapter")
            kernel = jnp.take(self.lm_head_kernel(), token_ids, axis=1)
            return hidden @ kernel.astype(hidden.dtype)
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return constrain(logits, ("batch", "length", "act_vocab"))
