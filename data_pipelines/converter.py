"""Clips (video files + labels) -> sharded TFRecord files + a JSON manifest; shared by the
VGGSound, AudioSet and toy-world converters.

`convert(plan, out_dir, ...)` decodes the clips in parallel processes (PyAV, `media.decode_clip`)
and writes each split as `{name}-{split}-00000-of-000NN.tfrecord`, a fixed list of clips per
shard. Each finished shard gets a sidecar `<shard>.json` (its planned clip ids, what was written
and what was skipped and why), written after the shard itself, so a rerun skips every shard
that has one. The manifest `{name}.manifest.json` holds the class list, per-split files and
counts, and the report of every skipped clip; `print_report` prints it as a table.

Skip reasons: the `media.SKIP_KINDS` ("missing file", "no audio stream", "no video stream",
"decode error", "too short") and "label not in class list".
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import multiprocessing
import os
from collections.abc import Mapping, Sequence

import tqdm

from data_pipelines import media, tfrecord

LABEL_NOT_IN_CLASSES = "label not in class list"
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
    """Worker: (row, label_index, options) -> ("ok", example bytes) or ("skip", kind, detail)."""
    row, label_index, options = task
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
    return ("ok", tfrecord.clip_to_example(clip))


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _shard_done(shard_path: str, planned: list[str]) -> dict | None:
    """The sidecar of a finished shard, None if it must be (re)written; error if it is another plan's."""
    sidecar = shard_path + ".json"
    if not (os.path.exists(sidecar) and os.path.exists(shard_path)):
        return None
    with open(sidecar, encoding="utf-8") as f:
        done = json.load(f)
    if done.get("planned") != planned:
        raise ValueError(f"{shard_path} was written for a different list of clips (another CSV, class "
                         "list, analysis size or clips_per_shard?): convert into a fresh --out directory")
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
        done = _shard_done(path, [r.clip_id for r in chunk])
        if done is not None:
            results[path] = done
        else:
            todo.append((split, path, chunk))
    tasks = [(r, class_index[r.label], options) for _, _, chunk in todo for r in chunk if r.label in class_index]
    total = sum(len(chunk) for _, _, chunk in todo)

    bar = tqdm.tqdm(total=total, desc=f"{name}: clips", unit="clip", disable=not progress or total == 0)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and tasks else None
    try:
        outputs = (pool.imap(_convert_one, tasks, chunksize=1) if pool is not None else map(_convert_one, tasks))
        for split, path, chunk in todo:
            written, shard_skipped = [], []
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
                        else:
                            shard_skipped.append({"clip_id": row.clip_id, "split": split, "reason": out[1],
                                                  "detail": out[2]})
                    bar.update(1)
            results[path] = {"planned": [r.clip_id for r in chunk], "written": written, "skipped": shard_skipped}
            _write_json(path + ".json", results[path])
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    manifest = {"version": MANIFEST_VERSION, "name": name, "classes": classes, "splits": {}, "skipped": [],
                "decode_options": dataclasses.asdict(options), "clips_per_shard": clips_per_shard,
                **dict(extra or {})}
    for split, path, _ in shards:
        entry = manifest["splits"].setdefault(split, {"files": [], "num_examples": 0, "num_skipped": 0})
        entry["files"].append(os.path.basename(path))
        entry["num_examples"] += len(results[path]["written"])
        entry["num_skipped"] += len(results[path]["skipped"])
        manifest["skipped"].extend(results[path]["skipped"])
    for row in skipped:
        entry = manifest["splits"].setdefault(row["split"], {"files": [], "num_examples": 0, "num_skipped": 0})
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
              f"{entry['num_skipped']} skipped")
    reasons = collections.Counter(s["reason"] for s in manifest["skipped"])
    for reason, count in reasons.most_common():
        print(f"  skipped, {reason}: {count}")
    for s in manifest["skipped"][:max_listed]:
        print(f"    {s['split']}\t{s['clip_id']}\t{s['reason']}\t{s['detail']}")
    if len(manifest["skipped"]) > max_listed:
        print(f"    ... {len(manifest['skipped']) - max_listed} more: see the manifest's 'skipped' list")
