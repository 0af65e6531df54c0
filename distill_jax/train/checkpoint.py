"""Orbax checkpoints of a training run: the trained state (step, trained weights, optimizer
state, mutable variables such as BatchNorm statistics) and every host's Grain iterator position, so a restarted run continues with exactly the
batches and weights an uninterrupted one would have.

The frozen base model is not saved: it comes from its own checkpoint (`convert.load_hf`)
on every start. Only steps known to be finite are saved (the trainer's job, `train.loop`),
so the latest checkpoint is always a good one. Orbax writes multi-host checkpoints
collectively (every host calls save/restore); the directory may be `gs://`.
"""
from __future__ import annotations

import grain
import jax
import orbax.checkpoint as ocp

TRAINED_KEYS = ("step", "params", "opt", "mutable", "nonfinite_run", "nonfinite_total")


def trained_part(state: dict) -> dict:
    return {k: state[k] for k in TRAINED_KEYS}


class TrainCheckpointer:
    """Saves every `every` steps (and when forced), keeps the newest `keep`; restores the latest."""

    def __init__(self, directory, *, every: int, keep: int = 2):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every and keep must be >= 1, got every={every}, keep={keep}")
        from distill_jax.multihost import path

        self.directory = path(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every))

    def save(self, state: dict, iterator=None, *, force: bool = False) -> bool:
        """Saves `state`'s trained part (and the iterator) if its step is due; True if it saved."""
        items = {"train": ocp.args.StandardSave(trained_part(state))}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        return self.manager.save(int(state["step"]), args=ocp.args.Composite(**items), force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, state: dict, iterator=None) -> dict | None:
        """`state` with its trained part from the latest checkpoint (iterator moved in place), or None."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trained_part(state))
        items = {"train": ocp.args.StandardRestore(abstract)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {**state, **restored["train"]}

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
