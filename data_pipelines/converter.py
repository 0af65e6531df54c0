"""Clips (video files + labels) -> sharded TFRecord files + a JSON manifest; shared by the
VGGSound, AudioSet and toy-world converters.

`convert(plan, out_dir, ...)` decodes the clips in worker processes (PyAV, `media.decode_clip`)
and writes each split as `{name}-{split}-00000-of-000NN.tfrecord`, a fixed list of clips per
shard. Each finished shard gets a sidecar `<shard>.json` (its planned clip ids, its decode
options, what was written, what was skipped and why, and which clips are silent), written
after the shard itself, so a rerun skips every shard that has one; a rerun with other decode
options is refused, naming them. The manifest `{name}.manifest.json` holds the class list,
per-split files and counts (clips, skipped, silent, and clips per class: `class_counts`, which the
study reads to tell the classes it distils on from unseen ones), the report of every skipped clip
and the list of silent ones; `print_report` prints it as a table.

Decoding always runs in worker processes, so a decoder that crashes (a segfault, a killed
worker) takes down a worker, not the run: the clips that were in flight are decoded again one
by one, each in a fresh process, and the one whose process dies again is skipped as
"decoder crashed".

Skip reasons: the `media.SKIP_KINDS` ("missing file", "no audio stream", "no video stream",
"decode error", "too short", "non-finite audio"), "decoder crashed" and "label not in class
list". Silent clips (every sample within `SILENT_PEAK` of 0) are written, and flagged.
"""
from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool

import numpy as np

import tqdm

from data_pipelines import media, tfrecord
from distill_jax import faults

LABEL_NOT_IN_CLASSES = "label not in class list"
DECODER_CRASHED = "decoder crashed"
SILENT_PEAK = 1  # int16 units (-90 dBFS): a clip whose samples all lie within it is silent
MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ClipRow:
    """One clip to convert: where its file is and what it is."""
    clip_id: str
    path: str
    start_sec: float  # where the clip starts in `path` (0 for files that are the clip itself)
    label: str
    split: str
    source_start_sec: float | None = None  # where it starts in the original video, if different


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How clips are decoded (see `media.decode_clip`)."""
    fps: float = 2.0
    max_short_side: int = 448
    max_seconds: float = 10.0
    min_seconds: float = 1.0
    jpeg_quality: int = 3

    def __post_init__(self):
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.max_short_side < 1:
            raise ValueError(f"max_short_side must be >= 1, got {self.max_short_side}")
        if not 0 <= self.min_seconds <= self.max_seconds:
            raise ValueError(f"need 0 <= min_seconds <= max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if not 2 <= self.jpeg_quality <= 31:
            raise ValueError(f"jpeg_quality (FFmpeg qscale) must be in 2..31, got {self.jpeg_quality}")


def shard_name(name: str, split: str, index: int, count: int) -> str:
    return f"{name}-{split}-{index:05d}-of-{count:05d}.tfrecord"


def _convert_one(task):
    """Worker: (row, label_index, options) -> ("ok", example bytes, silent) or ("skip", kind, detail)."""
    row, label_index, options = task
    faults.crash_if_clip(row.clip_id)
    try:
        pcm, jpegs = media.decode_clip(row.path, start_sec=row.start_sec, max_seconds=options.max_seconds,
                                       fps=options.fps, max_short_side=options.max_short_side,
                                       min_seconds=options.min_seconds, jpeg_quality=options.jpeg_quality)
    except media.ClipError as e:
        return ("skip", e.kind, e.detail)
    except Exception as e:  # noqa: BLE001 - any failure of one clip is that clip's skip, never lost work
        return ("skip", "decode error", f"{row.path}: {type(e).__name__}: {e}")
    clip = tfrecord.Clip(
        clip_id=row.clip_id, start_sec=row.start_sec if row.source_start_sec is None else row.source_start_sec,
        label_index=label_index, label_name=row.label, pcm16=pcm, sample_rate=media.SAMPLE_RATE,
        jpeg_frames=tuple(jpegs), fps=options.fps, split=row.split)
    silent = bool(pcm.size) and int(np.abs(pcm.astype(np.int32)).max()) <= SILENT_PEAK
    return ("ok", tfrecord.clip_to_example(clip), silent)


def die_with_parent() -> None:
    """Worker initializer: on Linux the kernel kills this process when its parent dies (a
    `kill -9` of the converter would otherwise leave its workers blocked on a queue forever)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class WorkersCannotStartError(RuntimeError):
    """Worker processes die while starting, before any clip reaches them."""


def _started() -> bool:
    return True


def worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """`workers` spawned processes that die with their parent, checked to start.

    With the "spawn" start method each worker first re-imports the script that started Python.
    A script that calls `main.run` at top level, without `if __name__ == "__main__":`, would
    run the study again in every worker; those workers die while starting and a
    `multiprocessing.Pool` starts new ones forever. Here that is a clear error instead.
    """
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=die_with_parent)
    try:
        pool.submit(_started).result()
    except BrokenProcessPool:
        pool.shutdown(wait=True, cancel_futures=True)
        script = getattr(sys.modules["__main__"], "__file__", None)
        raise WorkersCannotStartError(
            "worker processes died while starting (their error is printed above). Each worker "
            f"re-imports the script that started Python{f' ({script})' if script else ''}: if it calls "
            "distill_jax.main.run (or the converters) at top level, put that call under "
            "`if __name__ == \"__main__\":`") from None
    return pool


def _alone(task) -> tuple:
    """`task` decoded in a process of its own: a crash there is this clip's."""
    with worker_pool(1) as pool:
        try:
            return pool.submit(_convert_one, task).result()
        except BrokenProcessPool:
            return ("skip", DECODER_CRASHED, f"{task[0].path}: the decoding process died (e.g. a segfault in "
                                             "the decoder)")


def _decoded(tasks: Sequence, workers: int) -> Iterator[tuple]:
    """`_convert_one` of every task, in order, from `workers` processes that a crash cannot stop:
    when a worker dies, the clips in flight are decoded again one by one, each in its own process."""
    tasks = iter(tasks)
    pool, in_flight = worker_pool(workers), collections.deque()
    try:
        while True:
            while len(in_flight) < 2 * workers and (task := next(tasks, None)) is not None:
                try:
                    in_flight.append((task, pool.submit(_convert_one, task)))
                except BrokenProcessPool:  # a worker died before this task could be handed over
                    in_flight.append((task, None))
            if not in_flight:
                return
            task, future = in_flight.popleft()
            try:
                if future is None:
                    raise BrokenProcessPool("the pool broke before this clip reached it")
                result = future.result()
            except BrokenProcessPool:
                suspects = [task] + [t for t, _ in in_flight]
                in_flight.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                for suspect in suspects:
                    yield _alone(suspect)
                pool = worker_pool(workers)
                continue
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _shard_done(shard_path: str, planned: list[str], options: DecodeOptions) -> dict | None:
    """The sidecar of a finished shard, None if it must be (re)written; error if it is another
    plan's or was decoded with other options."""
    sidecar = shard_path + ".json"
    if not (os.path.exists(sidecar) and os.path.exists(shard_path)):
        return None
    with open(sidecar, encoding="utf-8") as f:
        done = json.load(f)
    if done.get("planned") != planned:
        raise ValueError(f"{shard_path} was written for a different list of clips (another CSV, class "
                         "list, analysis size or clips_per_shard?): convert into a fresh --out directory")
    wanted = dataclasses.asdict(options)
    written = done.get("decode_options")
    if written != wanted:
        differ = ("it records none (an older converter)" if written is None else
                  ", ".join(f"{k}={written.get(k)!r} there, {v!r} now" for k, v in wanted.items() if written.get(k) != v))
        raise ValueError(f"{shard_path} was decoded with other options ({differ}): convert into a fresh --out "
                         "directory, or rerun with the options it was written with")
    return done


def convert(plan: Mapping[str, Sequence[ClipRow]], out_dir, *, name: str, classes: Sequence[str],
            options: DecodeOptions = DecodeOptions(), clips_per_shard: int = 1000, workers: int | None = None,
            progress: bool = True, extra: Mapping | None = None, skipped: Sequence[Mapping] = ()) -> dict:
    """Converts every split of `plan` (split -> rows, in their final order) into `out_dir`.

    Rows whose label is not in `classes` are skipped ("label not in class list"). `skipped`
    lists clips the caller left out before conversion ({"clip_id", "split", "reason",
    "detail"}), reported with the rest. Returns the manifest (also written to
    `{out_dir}/{name}.manifest.json`); `extra` is stored in it as is.
    """
    if clips_per_shard < 1:
        raise ValueError(f"clips_per_shard must be >= 1, got {clips_per_shard}")
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise ValueError("class list has duplicate names")
    class_index = {c: i for i, c in enumerate(classes)}
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    workers = os.cpu_count() if workers is None else workers

    shards = []  # (split, shard path, planned rows, unknown-label rows)
    for split, rows in plan.items():
        ids = [r.clip_id for r in rows]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"split {split!r} lists clip ids more than once, e.g. {dup}")
        count = max(1, math.ceil(len(rows) / clips_per_shard))
        for i in range(count):
            chunk = list(rows[i * clips_per_shard:(i + 1) * clips_per_shard])
            shards.append((split, os.path.join(out_dir, shard_name(name, split, i, count)), chunk))

    results = {}
    todo = []
    for split, path, chunk in shards:
        done = _shard_done(path, [r.clip_id for r in chunk], options)
        if done is not None:
            results[path] = done
        else:
            todo.append((split, path, chunk))
    tasks = [(r, class_index[r.label], options) for _, _, chunk in todo for r in chunk if r.label in class_index]
    total = sum(len(chunk) for _, _, chunk in todo)

    bar = tqdm.tqdm(total=total, desc=f"{name}: clips", unit="clip", disable=not progress or total == 0)
    outputs = _decoded(tasks, max(1, workers))  # no process starts until a clip is needed
    try:
        for split, path, chunk in todo:
            written, shard_skipped, silent = [], [], []
            with tfrecord.TFRecordWriter(path) as writer:
                for row in chunk:
                    if row.label not in class_index:
                        shard_skipped.append({"clip_id": row.clip_id, "split": split, "reason": LABEL_NOT_IN_CLASSES,
                                              "detail": row.label})
                    else:
                        out = next(outputs)
                        if out[0] == "ok":
                            writer.write(out[1])
                            written.append(row.clip_id)
                            if out[2]:
                                silent.append(row.clip_id)
                        else:
                            shard_skipped.append({"clip_id": row.clip_id, "split": split, "reason": out[1],
                                                  "detail": out[2]})
                    bar.update(1)
            results[path] = {"planned": [r.clip_id for r in chunk], "decode_options": dataclasses.asdict(options),
                             "written": written, "skipped": shard_skipped, "silent": silent}
            _write_json(path + ".json", results[path])
            faults.point("shard")
    finally:
        bar.close()
        outputs.close()

    manifest = {"version": MANIFEST_VERSION, "name": name, "classes": classes, "splits": {}, "skipped": [], "silent": [],
                "decode_options": dataclasses.asdict(options), "clips_per_shard": clips_per_shard,
                **dict(extra or {})}
    for split, path, chunk in shards:
        entry = manifest["splits"].setdefault(split, {"files": [], "num_examples": 0, "num_skipped": 0,
                                                      "num_silent": 0, "class_counts": {}})
        entry["files"].append(os.path.basename(path))
        entry["num_examples"] += len(results[path]["written"])
        label_of = {r.clip_id: r.label for r in chunk}
        for clip_id in results[path]["written"]:
            entry["class_counts"][label_of[clip_id]] = entry["class_counts"].get(label_of[clip_id], 0) + 1
        entry["num_skipped"] += len(results[path]["skipped"])
        entry["num_silent"] += len(results[path]["silent"])
        manifest["skipped"].extend(results[path]["skipped"])
        manifest["silent"].extend({"clip_id": c, "split": split} for c in results[path]["silent"])
    for row in skipped:
        entry = manifest["splits"].setdefault(row["split"], {"files": [], "num_examples": 0, "num_skipped": 0,
                                                             "num_silent": 0, "class_counts": {}})
        entry["num_skipped"] += 1
        manifest["skipped"].append(dict(row))
    _write_json(os.path.join(out_dir, f"{name}.manifest.json"), manifest)
    return manifest


def load_manifest(path) -> dict:
    """A manifest written by `convert`, with its files as absolute paths (local or gs://, through
    etils.epath)."""
    from etils import epath

    path = os.fspath(path)
    manifest = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    base = epath.Path(path).parent if "://" in path else epath.Path(os.path.dirname(os.path.abspath(path)))
    for entry in manifest["splits"].values():
        entry["paths"] = [str(base / f) for f in entry["files"]]
    return manifest


def print_report(manifest: Mapping, max_listed: int = 100) -> None:
    """Per-split counts, skipped clips by reason, then the first `max_listed` skipped clips."""
    print(f"{manifest['name']}: {len(manifest['classes'])} classes")
    for split, entry in manifest["splits"].items():
        print(f"  {split:<10} {entry['num_examples']:>8} clips in {len(entry['files'])} shards, "
              f"{entry['num_skipped']} skipped, {entry.get('num_silent', 0)} silent (kept, flagged)")
    reasons = collections.Counter(s["reason"] for s in manifest["skipped"])
    for reason, count in reasons.most_common():
        print(f"  skipped, {reason}: {count}")
    for s in manifest["skipped"][:max_listed]:
        print(f"    {s['split']}\t{s['clip_id']}\t{s['reason']}\t{s['detail']}")
    if len(manifest["skipped"]) > max_listed:
        print(f"    ... {len(manifest['skipped']) - max_listed} more: see the manifest's 'skipped' list")
