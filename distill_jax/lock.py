"""One run per workdir: a lock file `<workdir>/.lock` naming its holder (host, pid, start time).

A second run on a workdir in use refuses to start, naming the holder. A lock left by a process
that died on this host (kill -9, preemption of a local run) is taken over, with a note; a lock
held from another host cannot be checked from here and is refused (delete the file if that run
is gone). On several hosts only process 0 holds it. A local workdir's lock is created with
O_EXCL (atomic); on gs:// the check and the write are two requests, so two runs started within
the same second can both pass (the documented limit).
"""
from __future__ import annotations

import json
import os
import socket
import time

from distill_jax import multihost

LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _start_time(pid)
    return holder.get("proc_start") is None or started is None or started == holder.get("proc_start")


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir for this run (process 0; no-op elsewhere)."""

    def __init__(self, workdir):
        self.path = multihost.path(workdir) / LOCK_NAME
        self.held = False

    def _me(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _start_time(os.getpid()),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _create(self) -> bool:
        data = json.dumps(self._me()).encode()
        if multihost.is_remote(self.path):
            if self.path.exists():
                return False
            self.path.write_bytes(data)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}  # being written or removed right now: treated as held (no takeover)

    def acquire(self) -> None:
        if not multihost.is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            self.held = True
            return
        holder = self._holder()
        same_host = holder.get("host") == socket.gethostname()
        if holder and same_host and not _alive(holder):
            print(f"note: {self.path}: taking over the lock of pid {holder['pid']} on {holder['host']} (started "
                  f"{holder.get('started')}), which is no longer running", flush=True)
            self.path.unlink(missing_ok=True)
            if self._create():
                self.held = True
                return
            holder = self._holder()
        raise WorkdirBusyError(
            f"workdir {self.path.parent} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(since {holder.get('started', '?')}; lock file {self.path}). Wait for that run, or, if it is gone "
            f"{'from another host' if holder and not same_host else ''}, delete the lock file")

    def release(self) -> None:
        if self.held:
            if self._holder().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
