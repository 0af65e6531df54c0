"""VGGSound (official CSV + downloaded mp4 clips) -> TFRecord shards + manifest.

    python -m data_pipelines.vggsound --csv vggsound.csv --video-dir DIR --out DIR \\
        [--fps 2] [--max-short-side 448] [--analysis-size 3090] [--workers N]

The CSV is the official headerless one: YouTube id, start seconds, label, split ("train" or
"test"; any other split name is kept as a split of its own). Clip files are looked up as
`--video-dir/--name-format`, by default "{ytid}_{start:06d}.mp4", the usual name of a
downloaded 10 s clip; such a file *is* the clip (`--trimmed`, default), otherwise the clip is
cut from the file at the CSV's start time (`--untrimmed`).

The **analysis split** (the clips the sensory-gap study and the switch are fitted on) is drawn
from train before anything is decoded: per class a share of `--analysis-size` proportional to
the class's train count (largest remainders), chosen by a seeded RNG from the class's clips
sorted by id, so it depends on the CSV and the seed only. Those clips are removed from train.

The class list is every label in the CSV, sorted, unless `--classes FILE` (one per line) fixes
it; then rows with other labels are skipped and reported. Output and resumption: see
`data_pipelines.converter`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from data_pipelines import converter, related_classes


@dataclasses.dataclass(frozen=True)
class CsvRow:
    ytid: str
    start: int
    label: str
    split: str

    @property
    def clip_id(self) -> str:
        return f"{self.ytid}_{self.start:06d}"


def read_csv(path) -> list[CsvRow]:
    """Rows of a VGGSound-format CSV; a malformed line is an error naming file and line.

    Labels with commas may be quoted (as in the official file) or not: the fields between the
    start time and the split are joined back with commas.
    """
    path = os.fspath(path)
    rows, seen = [], {}
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, fields in enumerate(csv.reader(f), start=1):
            if not fields or all(not x.strip() for x in fields):
                continue
            if len(fields) < 4:
                raise ValueError(f"{path}:{line_no}: expected 4 fields (YouTube id, start seconds, label, "
                                 f"split), got {len(fields)}: {fields}")
            ytid, start, label, split = fields[0].strip(), fields[1].strip(), ",".join(fields[2:-1]), fields[-1]
            label, split = label.strip(), split.strip()
            try:
                start_sec = int(float(start))
            except ValueError:
                raise ValueError(f"{path}:{line_no}: start seconds {start!r} is not a number") from None
            if not ytid or not label or not split:
                raise ValueError(f"{path}:{line_no}: empty YouTube id, label or split: {fields}")
            row = CsvRow(ytid, start_sec, label, split)
            if row.clip_id in seen:
                raise ValueError(f"{path}:{line_no}: clip {row.clip_id} already listed on line {seen[row.clip_id]}")
            seen[row.clip_id] = line_no
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def stratified_quota(counts: dict[str, int], size: int) -> dict[str, int]:
    """`size` split over classes in proportion to `counts`, largest remainders first (ties: name)."""
    total = sum(counts.values())
    if not 0 <= size <= total:
        raise ValueError(f"analysis size {size} must be between 0 and the {total} train clips")
    exact = {c: size * n / total for c, n in counts.items()}
    quota = {c: int(np.floor(x)) for c, x in exact.items()}
    by_remainder = sorted(counts, key=lambda c: (-(exact[c] - quota[c]), c))
    for c in by_remainder[:size - sum(quota.values())]:
        quota[c] += 1
    return quota


def draw_analysis_split(rows: Sequence[CsvRow], size: int, *, seed: int = 0,
                        from_split: str = "train") -> list[CsvRow]:
    """Rows moved from `from_split` to "analysis": stratified by class, seeded (see module doc)."""
    if size == 0:
        return list(rows)
    if any(row.split == "analysis" for row in rows):
        raise ValueError("the CSV already has an 'analysis' split: pass --analysis-size 0 to keep it as is")
    by_class = defaultdict(list)
    for row in rows:
        if row.split == from_split:
            by_class[row.label].append(row)
    quota = stratified_quota({c: len(r) for c, r in by_class.items()}, size)
    rng = np.random.default_rng(seed)
    chosen = set()
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda r: r.clip_id)
        for i in rng.choice(len(members), size=quota[label], replace=False):
            chosen.add(members[i].clip_id)
    return [dataclasses.replace(r, split="analysis") if r.clip_id in chosen else r for r in rows]


def make_plan(rows: Sequence[CsvRow], video_dir, *, name_format: str = "{ytid}_{start:06d}.mp4",
              trimmed: bool = True) -> dict[str, list[converter.ClipRow]]:
    """split -> converter rows, each split sorted by clip id."""
    plan = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.clip_id):
        path = os.path.join(os.fspath(video_dir), name_format.format(ytid=row.ytid, start=row.start))
        plan[row.split].append(converter.ClipRow(
            clip_id=row.clip_id, path=path, start_sec=0.0 if trimmed else float(row.start), label=row.label,
            split=row.split, source_start_sec=float(row.start)))
    return dict(sorted(plan.items()))


def read_class_list(path) -> list[str]:
    with open(os.fspath(path), encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate class names")
    return names


def add_decode_flags(p: argparse.ArgumentParser, *, max_seconds: float = 10.0) -> None:
    """The decoding and output flags the converters share."""
    p.add_argument("--video-dir", required=True, help="directory of the downloaded clips")
    p.add_argument("--out", required=True, help="output directory (shards + manifest)")
    p.add_argument("--fps", type=float, default=2.0, help="frames sampled per second")
    p.add_argument("--max-short-side", type=int, default=448, help="frames are resized to at most this short side")
    p.add_argument("--max-seconds", type=float, default=max_seconds, help="clip length kept")
    p.add_argument("--min-seconds", type=float, default=1.0, help="shorter audio is skipped as 'too short'")
    p.add_argument("--jpeg-quality", type=int, default=3, help="FFmpeg qscale, 2 (best) .. 31")
    p.add_argument("--clips-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def decode_options(args) -> converter.DecodeOptions:
    return converter.DecodeOptions(fps=args.fps, max_short_side=args.max_short_side, max_seconds=args.max_seconds,
                                   min_seconds=args.min_seconds, jpeg_quality=args.jpeg_quality)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True, help="the VGGSound CSV (headerless)")
    add_decode_flags(p)
    p.add_argument("--name", default="vggsound", help="prefix of the output files")
    p.add_argument("--name-format", default="{ytid}_{start:06d}.mp4", help="clip file name under --video-dir")
    p.add_argument("--untrimmed", action="store_true",
                   help="files are whole videos: cut each clip at the CSV's start time")
    p.add_argument("--classes", help="file with the class list, one per line (default: the CSV's labels)")
    p.add_argument("--analysis-size", type=int, default=3090,
                   help="clips moved from train to the analysis split (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the analysis split")
    p.add_argument("--other-labels", help="CSV of further valid labels per clip (VGGSounder's format: video_id, "
                   "label): recorded in the manifest, never offered as a clip's distractors")
    p.add_argument("--no-related", action="store_true", help="do not record the related-classes table "
                   "(data_pipelines/related_classes.py) in the manifest")
    args = p.parse_args(argv)

    rows = read_csv(args.csv)
    classes = read_class_list(args.classes) if args.classes else sorted({r.label for r in rows})
    rows = draw_analysis_split(rows, args.analysis_size, seed=args.seed)
    plan = make_plan(rows, args.video_dir, name_format=args.name_format, trimmed=not args.untrimmed)
    questions = {}
    if not args.no_related:
        questions["related_classes"] = {"source": related_classes.SOURCE,
                                        "table": related_classes.restrict(related_classes.load(), classes)}
    if args.other_labels:
        ids = {r.clip_id for r in rows}
        known = set(classes)
        other = {clip: sorted(labels & known) for clip, labels in related_classes.read_labels(args.other_labels).items()
                 if clip in ids}
        questions["other_labels"] = {clip: labels for clip, labels in sorted(other.items()) if labels}
    manifest = converter.convert(
        plan, args.out, name=args.name, classes=classes, options=decode_options(args),
        clips_per_shard=args.clips_per_shard, workers=args.workers, progress=not args.no_progress,
        extra={"source": {"csv": os.path.abspath(args.csv), "analysis_size": args.analysis_size,
                          "analysis_seed": args.seed}, **questions})
    converter.print_report(manifest)
    return manifest


if __name__ == "__main__":
    main()
