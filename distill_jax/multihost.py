"""One study on N hosts: start-up, who writes, barriers, and paths that may be on cloud storage.

Every host runs the same program on the same workdir (a shared bucket, `gs://...`, on a TPU
slice). Every host computes; only process 0 writes shared files, atomically (a temporary name
then a rename, so a reader never sees half a file), and the others wait at a barrier (`sync`)
before they read what it wrote. Paths go through `etils.epath`, so `gs://` works wherever a
local directory does.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import pathlib
import tempfile
import uuid

import jax
import numpy as np
from etils import epath

from distill_jax import faults


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto") -> None:
    """`jax.distributed.initialize`, before any other JAX call.

    With the three values (CPU/GPU clusters, tests): that cluster, gloo collectives on CPU. On a
    TPU VM (mode "auto": its TPU device files exist; "on": always): JAX's own detection, which
    reads the slice's hosts from the TPU metadata (a single-host VM is a 1-process cluster).
    mode "off": never.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--jax_distributed={mode!r}; expected auto, on or off")
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("--coordinator_address, --num_processes and --process_id go together "
                         f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    if mode == "off":
        return
    if all(given):
        if num_processes > 1 and os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif mode == "on" or _on_tpu_vm():
        jax.distributed.initialize()


def _on_tpu_vm() -> bool:
    """TPU chips attached to this machine (their device files), unless JAX is told to use the CPU."""
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def is_main() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every host waits here until all have arrived (a no-op on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_remote(p) -> bool:
    return "://" in str(p)


def path(p) -> epath.Path:
    """An epath.Path; a local path made absolute (orbax and the workers need absolute paths)."""
    p = epath.Path(p)
    return p if is_remote(p) else p.resolve()


def write_own(target, data: bytes) -> None:
    """This host writes `data` to `target` atomically (temp name + rename): for files of its own."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_bytes(data)
    faults.point("write")
    tmp.replace(target)


def write_bytes(target, data: bytes) -> None:
    """Process 0 writes `data` to shared file `target` atomically; other hosts do nothing."""
    if is_main():
        write_own(target, data)


def write_text(target, text: str) -> None:
    write_bytes(target, text.encode())


def write_json(target, value, **kw) -> None:
    write_text(target, json.dumps(value, **kw) + "\n")


def read_json(source):
    return json.loads(path(source).read_text())


def _lines(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_lines(target, records) -> None:
    """JSON lines, written atomically by process 0."""
    write_bytes(target, _lines(records))


def write_own_lines(target, records) -> None:
    """JSON lines of this host's own file (e.g. its part of a scored split), written atomically."""
    write_own(target, _lines(records))


def read_lines(source) -> list[dict]:
    return [json.loads(line) for line in path(source).read_text().splitlines() if line.strip()]


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array's whole value on this host. Collective when the
    array spans hosts: every host must call it, in the same order."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _cache_dir(*identity) -> pathlib.Path:
    """The local copy's directory of a remote file or directory, named by what identifies its content."""
    key = hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:16]
    return pathlib.Path(tempfile.gettempdir()) / "distill_jax_remote" / key


def local(p) -> str:
    """A local directory holding `p`'s files: `p` itself when local; a remote (gs://) directory is
    copied once into a local cache (tokenizers and safetensors readers need local files)."""
    p = path(p)
    if not is_remote(p):
        return str(p)
    files = sorted((str(epath.Path(top) / name)[len(str(p)):].lstrip("/"), epath.Path(top) / name)
                   for top, _, names in p.walk() for name in names)  # walk: GCS has no recursive glob
    stats = [f.stat() for _, f in files]
    cache = _cache_dir(str(p), [(rel, st.length, st.mtime) for (rel, _), st in zip(files, stats)])  # changed: anew
    if not (cache / ".complete").exists():
        for rel, source in files:
            target = cache / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
        (cache / ".complete").touch()
    return str(cache)


def local_file(p) -> str:
    """A local path holding file `p`'s bytes (`p` itself when local; remote files copied once)."""
    p = path(p)
    if not is_remote(p):
        return str(p)
    stat = p.stat()
    target = _cache_dir(str(p), stat.length, stat.mtime) / p.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    return str(target)


@contextlib.contextmanager
def atomic_dir(target, *, last: str):
    """A local directory to write all of directory `target`'s files into; on success it becomes
    `target` whole (an existing `target` is replaced). Local: a temporary sibling renamed into
    place, so a reader (or a rerun) sees the old directory or the new one, never a part. Remote
    (gs:// has no directory rename): the files are uploaded with `last` (the file that marks
    the directory complete, e.g. config.json) after all the others, an existing `last` removed
    first. Every host may call it; only process 0's files are kept."""
    target = path(target)
    if not is_main():
        with tempfile.TemporaryDirectory() as discarded:
            yield discarded
        return
    if is_remote(target):
        with tempfile.TemporaryDirectory() as local_dir:
            yield local_dir
            if (target / last).exists():
                (target / last).unlink()
            files = sorted(pathlib.Path(local_dir).rglob("*"), key=lambda p: p.name == last)
            for source in files:
                if source.is_file():
                    write_own(target / str(source.relative_to(local_dir)), source.read_bytes())
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield str(tmp)
        if not (tmp / last).exists():
            raise FileNotFoundError(f"{target}: {last} was not written; the directory is not complete")
        faults.point("dir")
        old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        if old.exists():
            old.rmtree()
    finally:
        if tmp.exists():
            tmp.rmtree()


@contextlib.contextmanager
def staged(target):
    """A local directory to write `target`'s files into: `target` itself when local; for a
    remote target, a temporary directory whose files are copied up on success."""
    target = path(target)
    if not is_remote(target):
        target.mkdir(parents=True, exist_ok=True)
        yield str(target)
        return
    with tempfile.TemporaryDirectory() as local_dir:
        yield local_dir
        copy(local_dir, target)


def copy(source, target) -> None:
    """File or directory `source` to `target` (local or gs:// on either side), each file atomically."""
    source, target = path(source), path(target)
    if not source.is_dir():
        write_own(target, source.read_bytes())
        return
    for top, _, names in source.walk():  # walk: GCS has no recursive glob
        for name in names:
            file = epath.Path(top) / name
            write_own(target / str(file)[len(str(source)):].lstrip("/"), file.read_bytes())
