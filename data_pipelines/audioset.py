"""AudioSet evaluation segments -> TFRecord shards + manifest (the unseen-class check).

    python -m data_pipelines.audioset --csv eval_segments.csv --ontology ontology.json \\
        --keep classes.tsv --video-dir DIR --out DIR

`eval_segments.csv` is AudioSet's: "#" comment lines, then rows of YouTube id, start seconds,
end seconds and the quoted comma-separated label MIDs. `ontology.json` is AudioSet's ontology
(a list of {"id": MID, "name": ...}); it maps MIDs to names. The keep list (`--keep`, one class
a line) says which classes to keep, each as a MID or an ontology name, optionally followed by a
tab and the name to use in the questions (e.g. "Bark<TAB>dog barking").

Each question has one true class, so a segment is kept when exactly one of its labels is a
kept class; segments with several kept classes are skipped and reported ("several kept
classes"); segments with none are not part of the set (only counted). Clip files are
`--video-dir/--name-format`, by default "{ytid}_{start:06d}.mp4" (start in whole seconds).
The split is named "eval".

Unseen classes, and the questions about them. The study reads this manifest as its "unseen"
split (`configs/paper.py:unseen_manifest=`, `config.data.unseen`): AudioSet classes that VGGSound
lacks, on which the distilled student is checked (the paper: 60.0 -> 72.3 %). A class counts as
unseen when no clip of it is in the splits the study distils on (the run manifest's label and
switch splits, by their `class_counts`); the keep list is the researcher's mapping, and a kept
class that has clips there stops the run at the prepare stage, naming the classes. Because
AudioSet names a class differently from VGGSound ("Bark" vs "dog barking"), a class whose
AudioSet name differs but whose sound VGGSound has is not caught by that check: leave such
classes out of the keep list, or give them their VGGSound name (the TAB column), which then is
caught. Each clip's question is its true class plus distractors drawn by the run's question
strategy from `config.data.unseen.distractors`: "unseen" (the paper config: the other kept
classes, so keep at least `num_options` of them) or "all" (the run's classes followed by the
kept ones, as the toy world asks its fixed 20-class question).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Mapping, Sequence

from data_pipelines import converter, vggsound

SEVERAL_KEPT = "several kept classes"


def read_segments_csv(path) -> list[tuple[str, float, float, list[str]]]:
    """(YouTube id, start, end, label MIDs) of each row; a malformed row is an error naming its line."""
    path = os.fspath(path)
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, fields in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 4:
                raise ValueError(f"{path}:{line_no}: expected 4 fields (YTID, start, end, labels), got {fields}")
            try:
                start, end = float(fields[1]), float(fields[2])
            except ValueError:
                raise ValueError(f"{path}:{line_no}: start/end {fields[1]!r}, {fields[2]!r} are not numbers") from None
            if not end > start:
                raise ValueError(f"{path}:{line_no}: end {end} is not after start {start}")
            mids = [m.strip() for m in fields[3].split(",") if m.strip()]
            rows.append((fields[0].strip(), start, end, mids))
    return rows


def load_ontology(path) -> dict[str, str]:
    """MID -> name of AudioSet's ontology.json."""
    with open(os.fspath(path), encoding="utf-8") as f:
        entries = json.load(f)
    return {e["id"]: e["name"] for e in entries}


def read_keep_list(path, ontology: Mapping[str, str]) -> dict[str, str]:
    """MID -> question name of each kept class; an unknown MID or name is an error naming it."""
    by_name = {}
    for mid, name in ontology.items():
        by_name.setdefault(name, mid)
    keep, unknown = {}, []
    with open(os.fspath(path), encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            key, _, display = line.rstrip("\n").partition("\t")
            key = key.strip()
            mid = key if key in ontology else by_name.get(key)
            if mid is None:
                unknown.append(key)
                continue
            keep[mid] = display.strip() or ontology[mid]
    if unknown:
        raise ValueError(f"{path}: not AudioSet MIDs or ontology names: {unknown}")
    if len(set(keep.values())) != len(keep):
        raise ValueError(f"{path}: two kept classes have the same question name")
    return keep


def make_plan(segments, keep: Mapping[str, str], video_dir, *, name_format: str = "{ytid}_{start:06d}.mp4"
              ) -> tuple[dict[str, list[converter.ClipRow]], list[dict], int]:
    """("eval" -> rows, skipped segments with several kept classes, count of segments with none)."""
    rows, skipped, without = [], [], 0
    for ytid, start, end, mids in segments:
        clip_id = f"{ytid}_{int(start):06d}"
        kept = [keep[m] for m in mids if m in keep]
        if not kept:
            without += 1
        elif len(kept) > 1:
            skipped.append({"clip_id": clip_id, "split": "eval", "reason": SEVERAL_KEPT, "detail": ", ".join(kept)})
        else:
            path = os.path.join(os.fspath(video_dir), name_format.format(ytid=ytid, start=int(start)))
            rows.append(converter.ClipRow(clip_id=clip_id, path=path, start_sec=0.0, label=kept[0], split="eval",
                                          source_start_sec=start))
    rows.sort(key=lambda r: r.clip_id)
    return {"eval": rows}, skipped, without


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True, help="AudioSet eval_segments.csv")
    p.add_argument("--ontology", required=True, help="AudioSet ontology.json")
    p.add_argument("--keep", required=True, help="classes to keep: MID or name [TAB question name] per line")
    vggsound.add_decode_flags(p)
    p.add_argument("--name", default="audioset")
    p.add_argument("--name-format", default="{ytid}_{start:06d}.mp4")
    args = p.parse_args(argv)

    ontology = load_ontology(args.ontology)
    keep = read_keep_list(args.keep, ontology)
    plan, several, without = make_plan(read_segments_csv(args.csv), keep, args.video_dir,
                                       name_format=args.name_format)
    manifest = converter.convert(
        plan, args.out, name=args.name, classes=sorted(keep.values()), options=vggsound.decode_options(args),
        clips_per_shard=args.clips_per_shard, workers=args.workers, progress=not args.no_progress,
        extra={"source": {"csv": os.path.abspath(args.csv), "kept_mids": keep,
                          "segments_without_kept_class": without}},
        skipped=several)
    converter.print_report(manifest)
    return manifest


if __name__ == "__main__":
    main()
