"""Scalar metrics to a JSONL log and a TensorBoard event file, without TensorFlow.

clu.metric_writers imports TensorFlow (DESIGN.md), so event files are written here:
TFRecord-framed `Event` protos (tensorboard/compat/proto/event.proto), hand-encoded
because only three fields are needed: wall_time, step and a Summary of simple values.
Only process 0 writes, as in multi-host runs every host computes the same metrics.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

import jax
from etils import epath

from data_pipelines.tfrecord import frame_record


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """An `Event` proto: wall_time (1, double), step (2, int64), file_version (3) or summary (5)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        out += _field_bytes(5, values)
    return out


class MetricWriter:
    """`write(step, {name: value})` appends to `<logdir>/metrics.jsonl` and a TensorBoard event file."""

    def __init__(self, logdir):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (logdir / "metrics.jsonl").open("a")
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._events = (logdir / name).open("ab")
        self._events.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))

    def write(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **{
            k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}) + "\n")
        self._events.write(frame_record(encode_event(time.time(), int(step), scalars=values)))

    def flush(self) -> None:
        if self.active:
            self._jsonl.flush()
            self._events.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._events.close()
