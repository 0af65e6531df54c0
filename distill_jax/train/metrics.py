"""Scalar metrics to a JSONL log and a TensorBoard event file, without TensorFlow.

TensorBoard events are written by tensorboardX (clu.metric_writers imports TensorFlow,
DESIGN.md). tensorboardX reaches gs:// only through google-cloud-storage, so gs:// event
files go through etils.epath here, like every other workdir file. Only process 0 writes, as
in multi-host runs every host computes the same metrics.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time

import jax
from etils import epath
from tensorboardX import SummaryWriter, record_writer


class _EpathFiles:
    """tensorboardX's writer factory for gs:// (its own needs google-cloud-storage)."""

    def open(self, path: str):
        return epath.Path(path).open("wb")

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


record_writer.register_writer_factory("gs", _EpathFiles())
_writers = itertools.count()  # event file names stay unique within a process and a second


class MetricWriter:
    """`write(step, {name: value})` appends to `<logdir>/metrics.jsonl` and a TensorBoard event file."""

    def __init__(self, logdir):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (logdir / "metrics.jsonl").open("a")
        self._events = SummaryWriter(os.fspath(logdir), flush_secs=30,
                                     filename_suffix=f".{os.getpid()}.{next(_writers)}")

    def write(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **{
            k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}) + "\n")
        for name, value in values.items():
            self._events.add_scalar(name, value, int(step))

    def flush(self) -> None:
        if self.active:
            self._jsonl.flush()
            self._events.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._events.close()
