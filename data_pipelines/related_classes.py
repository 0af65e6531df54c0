"""VGGSound classes a question must not offer as distractors of a class: synonyms and classes that
usually sound or show on the same clips, from real human labels.

VGGSound gives each clip one label, yet some classes are the same sound under two names ("dog
barking" / "dog bow-wow", "playing timpani" / "playing tympani": in VGGSounder every clip labelled
one is labelled the other) and others mostly come together ("bowling impact" clips are "striking
bowling" clips; many sports clips have a man speaking). A 10-way question that lists such a class
beside the answer has two right answers. VGGSounder (the PyPI package `vggsounder`, v1.0: a
re-annotation of VGGSound's test set by people outside this project, 29,509 labels of 12,014 clips,
its `data/vggsounder.csv`) says which classes co-occur.

The table (`vggsound_related.json`, `derive`): class b is related to class a when, of the
VGGSounder clips labelled a, at least THRESHOLD also carry b, and at least MIN_CLIPS do. It is
directed (a clip of a is usually also b), and it is ours: the threshold is not the paper's. On
VGGSounder's clips, a uniformly drawn 10-way question lists another of the clip's labels as a
distractor in 6.4 % of draws; with this table left out 5.8 %: the rest are clip-specific (a voice,
music) and only the clip's own labels fix them, which a manifest may carry (`other_labels`,
`python -m data_pipelines.vggsound --other-labels vggsounder.csv`).
"""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping

RELATED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vggsound_related.json")
THRESHOLD = 0.5
MIN_CLIPS = 5
SOURCE = ("VGGSounder v1.0 (PyPI vggsounder, data/vggsounder.csv): b is related to a when >= 50 % and >= 5 of "
          "the clips labelled a are also labelled b")


def read_labels(path) -> dict[str, set[str]]:
    """{clip id: its labels} of a VGGSounder-format CSV (header with `video_id` and `label`)."""
    clips: dict[str, set[str]] = defaultdict(set)
    with open(os.fspath(path), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"video_id", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a CSV with columns video_id and label (VGGSounder's format), got "
                             f"{reader.fieldnames}")
        for row in reader:
            clips[row["video_id"].strip()].add(row["label"].strip())
    return dict(clips)


def derive(clips: Mapping[str, Iterable[str]], *, threshold: float = THRESHOLD,
           min_clips: int = MIN_CLIPS) -> dict[str, list[str]]:
    """{class a: sorted classes related to it} from multi-label clips (module docstring)."""
    count: dict[str, int] = defaultdict(int)
    together: dict[tuple[str, str], int] = defaultdict(int)
    for labels in clips.values():
        labels = set(labels)
        for a in labels:
            count[a] += 1
            for b in labels - {a}:
                together[a, b] += 1
    related: dict[str, set[str]] = defaultdict(set)
    for (a, b), n in together.items():
        if n >= min_clips and n / count[a] >= threshold:
            related[a].add(b)
    return {a: sorted(related[a]) for a in sorted(related)}


def load() -> dict[str, list[str]]:
    """The shipped table (derived from VGGSounder by `derive`; tests/test_standin.py checks it)."""
    with open(RELATED_FILE, encoding="utf-8") as f:
        return json.load(f)["related"]


def restrict(related: Mapping[str, Iterable[str]], classes: Iterable[str]) -> dict[str, list[str]]:
    """The table among `classes` only (what a manifest records for its class list)."""
    keep = set(classes)
    out = {a: sorted(b for b in bs if b in keep) for a, bs in related.items() if a in keep}
    return {a: bs for a, bs in sorted(out.items()) if bs}


def write(path, vggsounder_csv) -> None:
    """(Re)derive the shipped file from VGGSounder's CSV."""
    table = derive(read_labels(vggsounder_csv))
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        json.dump({"source": SOURCE, "threshold": THRESHOLD, "min_clips": MIN_CLIPS, "related": table}, f, indent=1)
        f.write("\n")
