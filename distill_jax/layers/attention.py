"""Attention masks and the attention kernel call shared by all families.

Masks are boolean [B, 1, T, S] (True = may attend). Grouped-query attention is
native in `jax.nn.dot_product_attention` (query heads a multiple of kv heads),
so keys/values are never repeated in memory there.

Implementations (a model config's `attention_impl`; None picks one by backend):
- "xla": `jax.nn.dot_product_attention` lowered by XLA (materialises the scores);
- "cudnn": the same call through cuDNN's fused kernel (GPU, bf16/fp16 only). Only when asked
  for: never run here (no GPU), and a left-padded row that is fully masked may come out
  NaN there and poison the next layer's keys, so the GPU default stays "xla";
- "flash": the Pallas TPU flash-attention kernel (never materialises the [T, S] scores),
  for causal self-attention over left-padded rows (the decoder's training and scoring
  passes; a pass with a KV cache runs "xla"); under a mesh it runs per shard through `shard_map` (batch and heads split). Chosen
  by default when compiling for TPU (the mesh's devices) with head_dim and length multiples of
  128 (the 7B models' head_dim; smaller ones are untried), unless bf16 matmuls are asked for at
  "highest" precision (jax_default_matmul_precision), which Mosaic refuses in this kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

IMPLEMENTATIONS = ("xla", "cudnn", "flash")
FLASH_BLOCK = 128  # the Pallas kernel's default block: sequence lengths must be multiples of it


def causal_padding_mask(key_valid: jax.Array, query_length: int, offset: jax.Array | int = 0) -> jax.Array:
    """[B, 1, T, S] mask: query t (at absolute slot offset + t) sees key s iff s <= offset + t and key s is valid.

    key_valid: [B, S] bool/int, 1 where the key slot holds a real token.
    """
    key_slots = jnp.arange(key_valid.shape[1])[None, :]
    query_slots = offset + jnp.arange(query_length)[:, None]
    causal = key_slots <= query_slots  # [T, S]
    return causal[None, None, :, :] & key_valid.astype(bool)[:, None, None, :]


def check_implementation(name: str | None) -> None:
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl={name!r}; known: {IMPLEMENTATIONS} or None (chosen by backend)")


def target_platform() -> str:
    """The platform the program is compiled for: the ambient mesh's devices' (a TPU topology's when
    compiling ahead of time on a CPU machine), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def choose_implementation(name: str | None, query: jax.Array, *, causal_self: bool) -> str:
    """The implementation to run: `name` if given, else the backend's best that these shapes allow."""
    check_implementation(name)
    backend = target_platform()
    if name == "flash":
        return name if causal_self else "xla"  # e.g. generate's cached steps: the kernel has no offset
    if name is not None:
        return name
    # Mosaic refuses the kernel's bf16 matmuls at "highest" precision ("Bad lhs type").
    highest = query.dtype == jnp.bfloat16 and jax.config.jax_default_matmul_precision in ("highest", "float32")
    if (backend == "tpu" and causal_self and query.shape[1] % FLASH_BLOCK == 0 and query.shape[-1] % 128 == 0
            and not highest):
        return "flash"
    return "xla"


def attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
              *, scale: float, implementation: str | None = None, key_valid: jax.Array | None = None,
              query_chunk: int | None = None) -> jax.Array:
    """softmax(q k^T * scale + mask) v; q [B, T, N, H], k/v [B, S, K, H], N % K == 0.

    Fully masked query rows (left padding) come out as a uniform average, never NaN
    (with "flash" they attend to the other padding slots instead; either way their output
    is never read). `key_valid` [B, S] marks real tokens when `mask` is causal & key_valid
    with T == S (a decoder pass without cache): only then may "flash" run. `query_chunk`: with
    "xla", the queries are scored `query_chunk_size(T, query_chunk)` at a time, one after the
    other (`lax.map`), so only [B, N, chunk, S] scores are alive at once (the vision towers' long
    bidirectional segments, which the causal flash kernel cannot take); the same values.
    """
    causal_self = key_valid is not None and query.shape[1] == key.shape[1]
    impl = choose_implementation(implementation, query, causal_self=causal_self)
    if impl == "flash":
        return flash_attention(query, key, value, key_valid, scale=scale)
    chunk = query_chunk_size(query.shape[1], query_chunk)
    if chunk == query.shape[1]:
        return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, implementation=impl)
    b, t, n, h = query.shape
    chunks = t // chunk
    q = jnp.moveaxis(query.reshape(b, chunks, chunk, n, h), 1, 0)  # [chunks, B, c, N, H]
    one = lambda q, m: jax.nn.dot_product_attention(q, key, value, mask=m, scale=scale, implementation=impl)  # noqa: E731
    if mask.shape[2] == 1:  # a key mask (padding): the same for every chunk
        out = jax.lax.map(lambda q: one(q, mask), q)
    else:  # [B', 1, T, S] -> [chunks, B', 1, c, S]
        m = jnp.moveaxis(mask.reshape(*mask.shape[:2], chunks, chunk, mask.shape[3]), 2, 0)
        out = jax.lax.map(lambda qm: one(*qm), (q, m))
    return jnp.moveaxis(out, 0, 1).reshape(b, t, n, h)


def query_chunk_size(length: int, most: int | None) -> int:
    """The largest multiple of 8 that divides `length` and is at most `most` (None: `length`, one chunk;
    a length with no such divisor is not chunked)."""
    if most is None or most >= length:
        return length
    if most < 8:
        raise ValueError(f"query_chunk={most}: expected at least 8 (or None)")
    return next((c for c in range(most - most % 8, 7, -8) if length % c == 0), length)


def _flash_local(query, key, value, segment_ids, *, scale):
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    repeats = query.shape[2] // key.shape[2]
    to_heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, T, N, H] -> [B, N, T, H]
    q, k, v = (to_heads_first(x) for x in (query, jnp.repeat(key, repeats, 2), jnp.repeat(value, repeats, 2)))
    out = pallas_flash.flash_attention(
        q, k, v, segment_ids=pallas_flash.SegmentIds(q=segment_ids, kv=segment_ids),
        causal=True, sm_scale=scale)
    return to_heads_first(out)


def flash_attention(query, key, value, key_valid, *, scale: float) -> jax.Array:
    """Causal self-attention through the Pallas TPU flash kernel; left padding as its own segment.

    Real tokens are segment 1 and padding segment 0, so a real token never sees padding.
    Under a mesh the kernel runs per shard: batch over the batch axes, heads over "tensor" when
    the kv heads divide it (else every tensor shard computes all heads).
    """
    if query.shape[1] % FLASH_BLOCK:
        raise ValueError(f"flash attention needs the sequence length to be a multiple of {FLASH_BLOCK}, "
                         f"got {query.shape[1]} (use prompt buckets that are, or attention_impl='xla')")
    segment_ids = key_valid.astype(jnp.int32)
    local = functools.partial(_flash_local, scale=scale)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(query, key, value, segment_ids)
    from distill_jax.sharding import LOGICAL_RULES, fit_spec

    batch = fit_spec(PartitionSpec(LOGICAL_RULES["batch"]), query.shape[:1], mesh)[0]
    heads = LOGICAL_RULES["act_heads"]
    if key.shape[2] % mesh.shape[heads] or query.shape[2] % mesh.shape[heads]:
        heads = None  # too few kv heads to split: every shard keeps all heads
    qkv_spec = PartitionSpec(batch, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, PartitionSpec(batch, None)),
                         out_specs=qkv_spec, check_vma=False)(query, key, value, segment_ids)
