"""The one trainer: every training of the study (the toy warm start, the switch, the LoRA
distillation) runs through `train`.

A training declares its model, which variables it trains (`trained`: nnx.LoRAParam, nnx.Param,
a path filter), which change as side effects (`mutable`: BatchNorm statistics, dropout RNG
counters), its loss `loss_fn(model, batch, static) -> (loss, metrics)`, its optimizer block,
and a Grain iterator of complete host-local batches (model inputs and targets, one shape on
every host). The trainer owns the rest:
- the optimizer (`OptimizerConfig`, AdamW with warmup-cosine or a constant rate, clipping,
  accumulation through optax.MultiSteps);
- the pure jitted step `(state, frozen, batch) -> (state, metrics)` with explicit in/out
  shardings and the state donated (state = step, trained params, optimizer state, mutable
  variables; the frozen rest is an argument, never copied);
- placement: each host's batch becomes one global array per field
  (`jax.make_array_from_process_local_data`), so N hosts run what one host would;
- the non-finite guard, inside the step: an update whose loss, gradients or new parameters
  are not finite is skipped (weights, optimizer and mutable state unchanged; the batch counts as
  consumed) and counted in the metrics (`nonfinite_skips`); after `max_nonfinite_steps`
  consecutive skips the run stops naming the step and the last checkpoint, which, like every
  checkpoint, holds only finite weights;
- orbax checkpoints of the state and of every host's iterator position, every N steps: a
  restarted run resumes with exactly the batches and weights of an uninterrupted one;
- metrics: fetched from the device only at log steps (the host prepares the next batches while
  the device computes), averaged over the window, written to metrics.jsonl + TensorBoard
  (process 0) and printed as a progress line with the rate and ETA.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax import faults, multihost

SCHEDULES = ("warmup_cosine", "constant")


class NonFiniteError(FloatingPointError):
    """`max_nonfinite_steps` consecutive steps had a non-finite loss, gradient or updated weight
    (none of them was applied)."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW over the trained variables. `total_steps` counts optimizer updates (micro-batch
    steps / accumulate_steps); the schedule warms up linearly from 0 over `warmup_steps`, then
    decays by a cosine to 0 ("warmup_cosine"), or stays at `learning_rate` ("constant")."""

    learning_rate: float = 1e-4
    schedule: str = "warmup_cosine"
    warmup_steps: int = 10
    total_steps: int = 100
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0  # None or 0: no clipping
    accumulate_steps: int = 1  # micro-batches per optimizer update

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if not np.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be >= 1, got {self.accumulate_steps}")
        if self.schedule == "warmup_cosine" and (self.total_steps < 1 or
                                                 not 0 <= self.warmup_steps < self.total_steps):
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {self.warmup_steps}, {self.total_steps}")


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    if config.schedule == "constant":
        rate = config.learning_rate
    else:
        rate = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1),
                                                  config.total_steps)
    tx = optax.adamw(rate, weight_decay=config.weight_decay)
    if config.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)
    if config.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate_steps)
    return tx


# ---------------------------------------------------------------------------------------------
# State, step and placement
# ---------------------------------------------------------------------------------------------

def _on_mesh(tree, mesh):
    """Leaves not yet on `mesh` (fresh scalars, host arrays) replicated over it."""
    from distill_jax.sharding import put

    def place_leaf(x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        return put(x, NamedSharding(mesh, PartitionSpec()))
    return jax.tree.map(place_leaf, tree)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, mesh, *, trained=nnx.LoRAParam,
               mutable=nnx.Nothing):
    """(graphdef, state, frozen) of a model already placed on `mesh` (sharding.shard_model).

    state = {step, params (the `trained` variables), opt, mutable (the `mutable` ones)}; frozen
    is every other variable. Optimizer state is created with the parameters' shardings.
    """
    graphdef, params, changing, frozen = nnx.split(model, trained, mutable, ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"the model has no variables matching {trained}: nothing to train (LoRA models: "
                         "apply_lora before training)")
    params, changing, frozen = _on_mesh((params, changing, frozen), mesh)
    opt = jax.jit(tx.init)(params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": opt, "mutable": changing,
             "nonfinite_run": jnp.zeros((), jnp.int32), "nonfinite_total": jnp.zeros((), jnp.int32)}
    return graphdef, _on_mesh(state, mesh), frozen


def merge_model(graphdef, state, frozen) -> nnx.Module:
    return nnx.merge(graphdef, state["params"], state["mutable"], frozen)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable, *, mutable=nnx.Nothing,
              shardings=None):
    """The pure step `step(state, frozen, batch, static=()) -> (state, metrics)`, jitted with the
    state donated; `shardings` = (state shardings, frozen shardings, batch sharding) fixes its
    in/out shardings (None: as the arguments come). `static` (hashable, e.g. Qwen2-VL's video
    grid) is a compile-time argument. A step whose loss, gradients or updated parameters are not
    finite leaves params, opt and mutable as they were; `nonfinite_run` counts consecutive such
    steps, `nonfinite_total` all of them. Metrics: loss, grad_norm, finite, nonfinite_run,
    nonfinite_skips (the total), and loss_fn's own."""

    def train_step(state, frozen, batch, static=()):
        def objective(params):
            model = nnx.merge(graphdef, params, state["mutable"], frozen, copy=True)
            loss, metrics = loss_fn(model, batch, static)
            return loss, (metrics, nnx.state(model, mutable))

        (loss, (metrics, changed)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        skipped = (~finite).astype(jnp.int32)
        new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                     "opt": keep(opt, state["opt"]), "mutable": keep(changed, state["mutable"]),
                     "nonfinite_run": (state["nonfinite_run"] + 1) * skipped,
                     "nonfinite_total": state["nonfinite_total"] + skipped}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "finite": finite,
                           "nonfinite_run": new_state["nonfinite_run"],
                           "nonfinite_skips": new_state["nonfinite_total"], **metrics}

    if shardings is None:
        return jax.jit(train_step, donate_argnums=0, static_argnums=3)
    state_sharding, frozen_sharding, batch_sharding = shardings
    return jax.jit(train_step, donate_argnums=0, static_argnums=3,
                   in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                   out_shardings=(state_sharding, NamedSharding(batch_sharding.mesh, PartitionSpec())))


def batch_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


def batch_sharding(mesh) -> NamedSharding:
    """Per-clip arrays: axis 0 split over the mesh's batch axes (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def device_fields(batch: dict) -> dict:
    """The numeric fields of a host batch (strings such as clip ids stay on the host)."""
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    return {k: v for k, v in arrays.items() if v.dtype.kind in "biuf"}


def place(batch: dict, mesh) -> dict:
    """This host's batch -> global arrays [global batch, ...] split over the batch axes.
    Every host calls it with its own part of the same step's batch (same shapes)."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in device_fields(batch).items():
        try:
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        except ValueError as e:
            raise ValueError(f"batch field {key!r} (local shape {value.shape}) cannot be split over the mesh's "
                             f"batch axes {batch_axes(mesh)} of {dict(mesh.shape)}: {e}") from e
    return out


def local_rows(array: jax.Array) -> np.ndarray:
    """This host's rows of a global per-clip array, in its local batch order (the rows `place`
    took from this host), without fetching other hosts' data."""
    if array.is_fully_addressable:
        return np.asarray(array)
    shards = {}
    for shard in array.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, shard)
    return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long, how often to log and save. `workdir` None: no checkpoints or log files."""

    steps: int
    log_every: int = 50
    checkpoint_every: int = 0  # 0: no checkpoints
    keep: int = 2
    max_nonfinite_steps: int = 3  # consecutive skipped (non-finite) steps before the run stops

    def __post_init__(self):
        if self.steps < 1 or self.log_every < 1 or self.checkpoint_every < 0 or self.max_nonfinite_steps < 1:
            raise ValueError(f"need steps >= 1, log_every >= 1, checkpoint_every >= 0, max_nonfinite_steps >= 1; "
                             f"got {self}")


def _truncate_log(path: epath.Path, step: int) -> None:
    """Drop the JSON lines of steps after `step` (a killed run's steps that the resumed run
    repeats), and a partial last line (a kill mid-write), with a warning naming the file."""
    if not path.exists():
        return
    text = path.read_text()
    lines = text.split("\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):  # the last line, never finished
                print(f"warning: {path}: dropped a partial last line (a run killed while writing it): "
                      f"{line[:60]!r}", flush=True)
                continue
            raise ValueError(f"{path}: line {number} is not JSON: {line[:80]!r}") from None
        if row["step"] <= step:
            kept.append(line + "\n")
    multihost.write_text(path, "".join(kept))


def train(model: nnx.Module, loss_fn: Callable, batches: Iterator[dict], *, optimizer: OptimizerConfig,
          loop: LoopConfig, mesh, name: str, workdir=None, trained=nnx.LoRAParam, mutable=nnx.Nothing,
          static_inputs: Callable[[dict], tuple] = lambda batch: (), summary: Callable[[dict], str] | None = None,
          log_clip_ids: bool = False, history: list | None = None,
          observe: Callable[[dict], None] | None = None) -> nnx.Module:
    """Train `model` (placed on `mesh`) for `loop.steps` steps of `batches`; returns it trained.

    With `workdir`: checkpoints in workdir/checkpoints (resumed from the latest; the iterator
    must be a Grain iterator, its position is saved with it), metrics in workdir/logs, and with
    `log_clip_ids` process 0's clip ids of every step in workdir/batches.jsonl.
    `summary(averages) -> str` adds to the progress line; `history` gets (step, averages) of
    every log step. `observe(host batch)` sees every step's batch (distill_jax.input_stats).
    """
    from distill_jax.train.checkpoint import TrainCheckpointer
    from distill_jax.train.metrics import MetricWriter

    tx = make_optimizer(optimizer)
    graphdef, state, frozen = init_state(model, tx, mesh, trained=trained, mutable=mutable)
    shardings = (jax.tree.map(lambda x: x.sharding, state), jax.tree.map(lambda x: x.sharding, frozen),
                 batch_sharding(mesh))
    step_fn = make_step(graphdef, tx, loss_fn, mutable=mutable, shardings=shardings)
    checkpointer = writer = order_log = None
    if workdir is not None:
        workdir = multihost.path(workdir)
        if loop.checkpoint_every:
            checkpointer = TrainCheckpointer(workdir / "checkpoints", every=loop.checkpoint_every, keep=loop.keep)
            restored = checkpointer.restore_latest(state, batches)
            if restored is not None:
                state = restored
                print(f"{name}: resumed from step {int(state['step'])}", flush=True)
        start_step = int(state["step"])
        _truncate_log(workdir / "batches.jsonl", start_step)
        _truncate_log(workdir / "logs" / "metrics.jsonl", start_step)
        multihost.sync(f"{name}: logs truncated")
        writer = MetricWriter(workdir / "logs")
        if log_clip_ids and multihost.is_main():
            order_log = (workdir / "batches.jsonl").open("a")
    step = start = int(state["step"])
    pending, window, last_good = [], [], (checkpointer.latest_step() if checkpointer else None)
    clock = time.perf_counter()

    def fetch():
        """The pending steps' metrics from the device; warns of skipped (non-finite) steps and
        stops after `max_nonfinite_steps` in a row."""
        values = jax.device_get([m for _, m in pending])
        for (at, _), m in zip(pending, values):
            if not bool(m["finite"]):
                print(f"warning: {name}: loss {float(m['loss'])} or its gradients are not finite at step {at}; "
                      f"the update was skipped ({int(m['nonfinite_run'])} in a row)", flush=True)
                if int(m["nonfinite_run"]) >= loop.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{name}: {int(m['nonfinite_run'])} consecutive non-finite steps up to step {at} (loss "
                        f"{float(m['loss'])}), none applied; stopped. The last checkpoint is step {last_good} in "
                        f"{checkpointer.directory if checkpointer else None}")
            window.append(m)
        pending.clear()

    try:
        while step < loop.steps:
            batch = next(batches)
            if observe is not None:
                observe(batch)
            state, metrics = step_fn(state, frozen, place(batch, mesh), static_inputs(batch))
            step += 1
            pending.append((step, metrics))
            faults.point("train_step")
            if order_log is not None:
                order_log.write(json.dumps({"step": step, "clip_ids": [str(c) for c in batch["clip_id"]]}) + "\n")
                order_log.flush()  # survives a kill
            due_log = step % loop.log_every == 0 or step == loop.steps
            due_save = checkpointer is not None and (step % loop.checkpoint_every == 0 or step == loop.steps)
            if due_log or due_save:
                fetch()  # a checkpoint holds only steps known to be finite
            if due_save:
                checkpointer.save(state, batches, force=step == loop.steps)
                last_good = step
                faults.point("checkpoint_write")  # orbax writes in the background: a kill here tears it
            if window and due_log:
                finite = [m for m in window if bool(m["finite"])] or window  # skipped steps' NaNs kept out
                averages = {k: float(np.mean([float(m[k]) for m in finite])) for k in window[0]
                            if k not in ("finite", "nonfinite_run", "nonfinite_skips")}
                averages["nonfinite_skips"] = float(window[-1]["nonfinite_skips"])
                window.clear()
                if history is not None:
                    history.append((step, averages))
                if writer is not None:
                    writer.write(step, averages)
                    writer.flush()
                rate = (step - start) / (time.perf_counter() - clock)
                extra = f" {summary(averages)}" if summary else ""
                if multihost.is_main():
                    print(f"{name}: step {step}/{loop.steps} loss {averages['loss']:.4f}{extra} {rate:.2f} steps/s "
                          f"ETA {(loop.steps - step) / rate:.0f} s", flush=True)
    finally:
        if order_log is not None:
            order_log.close()
        if writer is not None:
            writer.close()
        if checkpointer is not None:
            checkpointer.close()
    return merge_model(graphdef, state, frozen)
