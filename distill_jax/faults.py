"""Fault injection for the reliability tests: a process killed at a named point, as a
preemption or an OOM kill would, with nothing to clean up after it.

The code marks places where a kill is most likely to tear something with `point(name)`: a
file between its temporary write and its rename, a scoring batch, a training step, a
checkpoint write in flight, a directory before its rename. Without the environment variables
below `point` returns at once.

    DISTILL_JAX_KILL=<stage>/<point>/<n>   SIGKILL this process at the n-th `point` of that name
                                           during that stage (stages: main's, "none" outside them)
    DISTILL_JAX_FAULT_LOG=<file>           append "<stage>/<point>" per point reached (to draw from)
    DISTILL_JAX_CRASH_CLIP=<clip id>       the converter's decoding process segfaults on that clip
"""
from __future__ import annotations

import collections
import os
import signal

_stage = "none"
_counts: collections.Counter = collections.Counter()


def set_stage(name: str) -> None:
    global _stage
    _stage = name


def point(name: str) -> None:
    kill, log = os.environ.get("DISTILL_JAX_KILL"), os.environ.get("DISTILL_JAX_FAULT_LOG")
    if not kill and not log:
        return
    key = f"{_stage}/{name}"
    _counts[key] += 1
    if log:
        with open(log, "a") as f:
            f.write(key + "\n")
    if kill == f"{key}/{_counts[key]}":
        os.kill(os.getpid(), signal.SIGKILL)


def crash_if_clip(clip_id: str) -> None:
    """In a decoding worker: a real segfault (SIGSEGV) on the clip named by DISTILL_JAX_CRASH_CLIP."""
    if os.environ.get("DISTILL_JAX_CRASH_CLIP") == clip_id:
        os.kill(os.getpid(), signal.SIGSEGV)
