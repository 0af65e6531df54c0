"""What the jitted programs were fed: per model and program its distinct input shapes (each is one
XLA compile of that program) against the most its padding allows, and per split how much of the
input was padding.

`InputLog(path)` is kept per seed workdir (`input_shapes.json`); the scorer and the trainer call
`observer(...)(host batch)` on every batch before placing it. Shapes are recorded as the jitted
program sees them, global: a host batch's leading (batch) axis times the process count (every
host's batch has the same shape, pipeline.AgreeOnShapes). Padding counts are summed over hosts
when saved, so a run on several hosts records what one host would. Every host calls `save()` after
each scoring or training (one small all-gather); process 0 writes, only when something changed,
merged with what earlier runs recorded, so a resumed run keeps the figures of the work it skips.
"""
from __future__ import annotations

import copy
import hashlib
import threading

import jax
import numpy as np

from distill_jax import multihost


def signature(batch: dict, processes: int = 1) -> dict[str, list[int]]:
    """The global shapes of a host batch's numeric fields (what a jitted call's input shapes are
    made of): its leading axis is the batch, split evenly over `processes` hosts."""
    out = {}
    for key, value in batch.items():
        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            shape = [int(n) for n in array.shape]
            if shape:
                shape[0] *= processes
            out[key] = shape
    return dict(sorted(out.items()))


def padding_counts(batch: dict) -> dict[str, list[int]]:
    """[real, total] prompt tokens and (video) patches of a host batch."""
    counts = {}
    if "attention_mask" in batch:
        mask = np.asarray(batch["attention_mask"])
        counts["tokens"] = [int(mask.sum()), int(mask.size)]
    if "pixel_values_videos" in batch and np.ndim(batch["pixel_values_videos"]) == 4:
        grid = np.asarray(batch["video_grid_thw"])
        counts["patches"] = [int(np.prod(grid, axis=1).sum()), int(np.prod(batch["pixel_values_videos"].shape[:3]))]
    return counts


class InputLog:
    """Shapes and padding of one seed's runs (see the module docstring)."""

    def __init__(self, path):
        self.path = multihost.path(path)
        self._lock = threading.Lock()
        self.programs: dict[str, dict] = {}  # "model/program" -> {"shapes": [...], "bound_per_batch_size": n}
        self.padding: dict[str, dict] = {}  # "model/program/split" -> {"tokens": [real, total], ...}
        self._host_padding: dict[str, dict] = {}  # this run's counts of this host's batches, summed at save
        self._touched: set[tuple[str, str]] = set()  # (model/program, split) observed since the last save
        if self.path.exists():
            saved = multihost.read_json(self.path)
            self.programs, self.padding = saved.get("programs", {}), saved.get("padding", {})
        self._written = self._state()

    def _state(self) -> dict:
        return copy.deepcopy({"programs": self.programs, "padding": self.padding})

    def observer(self, model: str, program: str, split: str, bound: int | None = None):
        """A callable for every host batch of `model`'s `program` ("score", "train") on `split`;
        `bound`: the most input shapes one batch size can give (the padding's bucket count)."""
        key = f"{model}/{program}"
        counts: dict[str, list[int]] = {}

        processes = jax.process_count()

        def observe(batch: dict) -> None:
            sig = signature(batch, processes)
            with self._lock:
                entry = self.programs.setdefault(key, {"shapes": [], "bound_per_batch_size": bound})
                if bound is not None:
                    entry["bound_per_batch_size"] = bound
                if sig not in entry["shapes"]:
                    entry["shapes"].append(sig)
                self._touched.add((key, split))
                for name, (real, total) in padding_counts(batch).items():
                    have = counts.setdefault(name, [0, 0])
                    have[0] += real
                    have[1] += total
                if counts:
                    self._host_padding[f"{key}/{split}"] = {name: list(v) for name, v in counts.items()}

        return observe

    def save(self) -> None:
        """Sum this run's padding counts over hosts (every host must call it) and write the log
        from process 0 if it changed."""
        with self._lock:
            host = copy.deepcopy(self._host_padding)
        cells = [(key, name) for key in sorted(host) for name in sorted(host[key])]
        if jax.process_count() > 1:
            # Every host observed the same programs and splits (they run the same steps), so the
            # cells line up; a mismatch would sum unrelated counts, so it stops here instead.
            from jax.experimental import multihost_utils

            digest = np.frombuffer(hashlib.sha256(repr(cells).encode()).digest(), np.uint8)
            if not (multihost_utils.process_allgather(digest) == digest).all():
                raise RuntimeError(f"{self.path}: hosts observed different programs or splits; padding not summed")
            values = np.asarray([host[key][name] for key, name in cells], np.int64).reshape(-1, 2)
            # int32 on the wire (JAX without x64): sent as base-2**24 digits, summed as int64 here.
            digits = np.stack([values >> 24, values & (2**24 - 1)]).astype(np.int32)
            gathered = np.asarray(multihost_utils.process_allgather(digits), np.int64).sum(axis=0)
            values = (gathered[0] << 24) + gathered[1]
        else:
            values = [host[key][name] for key, name in cells]
        with self._lock:
            for (key, name), (real, total) in zip(cells, values):
                self.padding.setdefault(key, {})[name] = [int(real), int(total)]
            state = self._state()
            touched, self._touched = sorted(self._touched), set()
        if multihost.is_main():
            view = summary(state)
            for key, split in touched:
                program = view["programs"][key]
                bound = "" if program["bound"] is None else f" (at most {program['bound']})"
                padding = view["padding"].get(f"{key}/{split}", {})
                print(f"inputs: {key} on {split}: {program['shapes']} input shapes{bound}"
                      + "".join(f", {name} {fraction:.1%} padding" for name, fraction in sorted(padding.items())),
                      flush=True)
        if state == self._written:
            return
        self._written = state
        if multihost.is_main():
            multihost.write_json(self.path, state, indent=1, sort_keys=True)


def summary(log: dict) -> dict:
    """results.json's view of a seed's log: per program the number of shapes, the bound (its
    padding's bucket count x the batch sizes seen) and whether it held; per split the padding
    fractions."""
    programs = {}
    for key, entry in sorted(log.get("programs", {}).items()):
        shapes = entry["shapes"]
        batch_sizes = sorted({next(iter(s.values()))[0] for s in shapes if s})
        per = entry.get("bound_per_batch_size")
        bound = None if per is None else per * len(batch_sizes)
        programs[key] = {"shapes": len(shapes), "bound": bound, "within_bound": None if bound is None else
                         len(shapes) <= bound, "batch_sizes": batch_sizes}
    padding = {key: {name: (1 - real / total if total else 0.0) for name, (real, total) in counts.items()}
               for key, counts in sorted(log.get("padding", {}).items())}
    return {"programs": programs, "padding": padding}
