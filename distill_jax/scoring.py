"""Scoring a split on every host: per-clip records, resumable, merged by process 0.

The input side is the trainer's: each host's complete batch is placed as one global array
per field (`train.loop.place`), one jitted function computes per-clip outputs for the global
batch, and each host takes back only its own rows (`local_rows`, never another host's data).
Each host writes its records of every `chunk_batches` batches to a part file of its own under
`<out>.parts-*/`; when all hosts have finished, process 0 merges the parts in the split's
record order (what one host would have written) into `out`, atomically, and removes them. A
rerun skips the chunks whose parts every host has written.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax import faults, multihost
from distill_jax.train.loop import batch_sharding, local_rows, place


def score_split(dataset, compute: Callable, record: Callable[[dict, int, np.ndarray], dict], out, *, mesh,
                num_batches: int, chunk_batches: int = 0, static_inputs: Callable[[dict], tuple] = lambda b: (),
                desc: str = "", observe: Callable[[dict], None] | None = None) -> list[dict]:
    """Records of every valid clip of `dataset` (this host's Grain batches), written to `out`.

    compute(placed batch, static) -> global per-clip array [B, ...] (jitted by the caller);
    record(host batch, row, outputs row) -> the clip's JSON record. Returns all hosts' records
    in record order (every host reads the merged file). `observe(host batch)` sees every batch
    that is computed (distill_jax.input_stats).
    """
    import tqdm

    out = multihost.path(out)
    if out.exists():
        if multihost.is_main():  # parts a run killed right after its merge left behind
            for stale in out.parent.glob(f"{out.name}.parts-*"):
                stale.rmtree()
        return multihost.read_lines(out)
    chunk_batches = chunk_batches or num_batches
    hosts, me = jax.process_count(), jax.process_index()
    parts = out.parent / f"{out.name}.parts-{chunk_batches}x{hosts}"  # parts of another chunking are not reused
    parts.mkdir(parents=True, exist_ok=True)
    part = lambda k, host: parts / f"part-{k:05d}-host{host:03d}.jsonl"
    finished = lambda k: all(part(k, h).exists() for h in range(hosts))
    pending: list[dict] = []
    i = -1
    progress = tqdm.tqdm(dataset, total=num_batches, desc=desc, leave=False, disable=not multihost.is_main())
    for i, batch in enumerate(progress):
        if finished(i // chunk_batches):
            continue  # scored by an earlier run
        if observe is not None:
            observe(batch)
        values = local_rows(compute(place(batch, mesh), static_inputs(batch)))
        faults.point("score_batch")
        for row in np.flatnonzero(np.asarray(batch["valid"])):
            pending.append({**record(batch, row, values[row]), "index": int(batch["index"][row])})
        if (i + 1) % chunk_batches == 0:
            multihost.write_own_lines(part(i // chunk_batches, me), pending)
            pending = []
    if i >= 0 and not finished(i // chunk_batches) and (i + 1) % chunk_batches:
        multihost.write_own_lines(part(i // chunk_batches, me), pending)  # the last, partial chunk
    multihost.sync(f"scored {out}")
    if multihost.is_main():
        rows = [r for p in sorted(parts.iterdir()) if p.name.endswith(".jsonl") for r in multihost.read_lines(p)]
        rows.sort(key=lambda r: r["index"])
        seen = set()
        merged = []
        for r in rows:  # a clip scored twice (a padded evaluation slot) is counted once
            if r["index"] not in seen:
                seen.add(r["index"])
                merged.append({k: v for k, v in r.items() if k != "index"})
        multihost.write_lines(out, merged)
        parts.rmtree()
    multihost.sync(f"merged {out}")
    return multihost.read_lines(out)


def num_batches(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


@functools.lru_cache(maxsize=16)
def _letter_program(graphdef, letters: tuple[int, ...], model_inputs: Callable, mesh):
    """One jitted program per model structure: scoring split after split compiles once."""
    letter_ids = jnp.asarray(letters, jnp.int32)

    @partial(jax.jit, static_argnums=(2,), out_shardings=batch_sharding(mesh))
    def letter_logits(state, batch, static):
        model = nnx.merge(graphdef, state)
        hidden = model.hidden_states(**model_inputs(batch, static))[:, -1]
        return model.logits(hidden, letter_ids).astype(jnp.float32)

    return letter_logits


def letter_scorer(model: nnx.Module, letter_token_ids, model_inputs: Callable[[dict, tuple], dict], mesh):
    """compute(placed batch, static) -> letter logits [B, C] at the answer (last) position."""
    graphdef, state = nnx.split(model)
    program = _letter_program(graphdef, tuple(int(t) for t in letter_token_ids), model_inputs, mesh)
    return lambda batch, static: program(state, batch, static)


def letter_record(batch: dict, row: int, logits: np.ndarray) -> dict:
    return {"clip_id": str(batch["clip_id"][row]), "label": int(batch["label"][row]),
            "answer": int(batch["answer"][row]), "letter_logits": [float(v) for v in logits],
            "predicted": int(np.argmax(logits))}


@functools.lru_cache(maxsize=4)
def _pooled_vision_program(graphdef, mesh):
    @partial(jax.jit, static_argnums=(2,), out_shardings=batch_sharding(mesh))
    def pooled(state, batch, static):
        from distill_jax.models.qwen2_vl import padded_token_mask

        model = nnx.merge(graphdef, state)
        pixels, grid = batch["pixel_values_videos"], batch["video_grid_thw"]
        tokens = model.visual.padded(pixels, grid).astype(jnp.float32)  # [B, F * L / 4, D]
        real = padded_token_mask(grid, pixels.shape[1], pixels.shape[2], model.config.vision.spatial_merge_size)
        return jnp.sum(tokens * real[..., None], 1) / jnp.maximum(jnp.sum(real, 1), 1)[:, None]

    return pooled


def pooled_vision_scorer(model: nnx.Module, mesh):
    """compute(placed Qwen2VLTransform batch, static) -> [B, D]: the mean over each clip's merged
    vision-tower tokens (its own, not the padding's) (the clip's pooled visual embedding; the tower is frozen, the LM unused)."""
    graphdef, state = nnx.split(model)
    program = _pooled_vision_program(graphdef, mesh)
    return lambda batch, static: program(state, batch, static)
