"""Letter scoring and greedy decoding for the causal LMs (Qwen2 and the families built on it).

`score_choices` is how every model answers a multiple-choice question: one
forward pass over a left-padded batch, the logits of the choice tokens (A-J)
at the last position. `generate` is greedy decoding with the KV cache, jitted
with fixed shapes (the prompt length and `max_new_tokens`).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx



def _check_left_padded(attention_mask) -> None:
    if attention_mask is None or isinstance(attention_mask, jax.core.Tracer):
        return
    last = np.asarray(attention_mask)[:, -1]
    if not np.all(last):
        rows = np.flatnonzero(last == 0).tolist()
        raise ValueError(f"batch must be left-padded: rows {rows} end in padding, so their answer "
                         "position is not the last one")


@partial(nnx.jit, static_argnums=3)
def _score_choices(model, batch, choice_token_ids, static_items):
    hidden = model.hidden_states(**batch, **dict(static_items))
    return model.logits(hidden[:, -1], choice_token_ids)


def score_choices(model: nnx.Module, batch: dict, choice_token_ids) -> jax.Array:
    """Logits [B, C] of `choice_token_ids` (e.g. the letters A-J) at the answer position.

    `batch` holds the model's inputs (`input_ids`, `attention_mask`, and for the
    multimodal families their feature inputs), left-padded so that the answer
    position is the last one for every row. A model with `prepare_inputs` (Qwen2-VL)
    first derives host-side inputs and static values (grids) from the batch; one
    program is compiled per distinct static value.
    """
    _check_left_padded(batch.get("attention_mask"))
    prepare = getattr(model, "prepare_inputs", None)
    arrays, static = prepare(batch) if prepare is not None else (batch, {})
    return _score_choices(model, arrays, jnp.asarray(choice_token_ids, jnp.int32), tuple(sorted(static.items())))


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "static_items"))
def _generate(graphdef, state, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
              inputs, static_items):
    model = nnx.merge(graphdef, state)
    batch, length = input_ids.shape
    cache = model.init_cache(batch, length + max_new_tokens)
    logits, cache = model.forward_cached(cache, input_ids, attention_mask, **inputs, **dict(static_items))
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)

    def emit(i, token, tokens, done):
        token = jnp.where(done, pad_token_id, token)
        return tokens.at[:, i].set(token), done | (token == eos_token_id)

    tokens, done = emit(0, first, tokens, jnp.zeros((batch,), jnp.bool_))

    def step(i, carry):
        tokens, cache, done = carry
        logits, cache = model.forward_cached(
            cache, jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1), jnp.ones((batch, 1), jnp.bool_))
        tokens, done = emit(i, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), tokens, done)
        return tokens, cache, done

    tokens, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (tokens, cache, done))
    return tokens


def generate(model: nnx.Module, input_ids, attention_mask=None, max_new_tokens: int = 1, *,
             eos_token_id: int | None = None, pad_token_id: int | None = None, **inputs) -> jax.Array:
    """Greedy continuation [B, max_new_tokens] of a left-padded batch (= HF generate(do_sample=False)).

    After a row emits `eos_token_id` it emits `pad_token_id` (as HF does); with no
    eos every row runs `max_new_tokens` steps. `inputs` are a multimodal model's other
    prompt inputs (features, pixels, grids; through its `prepare_inputs`, as `score_choices`),
    read by the prompt pass only. Compiled once per (prompt length, max_new_tokens, static inputs).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids, jnp.bool_)
    _check_left_padded(attention_mask)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = -1 if eos_token_id is None else eos_token_id
    pad = (eos_token_id if pad_token_id is None else pad_token_id) if eos_token_id is not None else 0
    static = {}
    if inputs:
        prepare = getattr(model, "prepare_inputs", None)
        batch = {"input_ids": np.asarray(input_ids), "attention_mask": np.asarray(attention_mask), **inputs}
        inputs, static = prepare(batch) if prepare is not None else (inputs, {})
        inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, input_ids, jnp.asarray(attention_mask, jnp.bool_), max_new_tokens,
                     jnp.int32(eos), jnp.int32(pad), inputs, tuple(sorted(static.items())))
