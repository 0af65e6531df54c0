"""Human answers to the study's 10-way questions: read, checked and scored; and simulated ones.

The paper asks people the models' question in three conditions: the clip's sound alone
("audio"), the silent video ("video") and the video with its sound ("audio_video"). A
response file is a CSV with the columns

    clip_id, condition, participant, answer, options

`answer` is a letter of the shown options or a class name; `options` lists the shown class
names in letter order, `|`-separated, so a letter resolves to a class. A malformed row is an
error naming the file and line; a clip the run does not know is counted and reported
(`HumanResponses.unknown_clips`), not silently dropped.

The toy world has no people: `simulate` writes a response file of simulated participants
whose chance of answering a class right in a condition is what the world's design allows
there (its `*_pair_bayes_accuracy`: a class whose sound is drawn from a partner's overlap is
heard right only that often), moved by each participant's own skill. Everything that reads it
labels it simulated.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import string
from collections.abc import Mapping, Sequence

import numpy as np

CONDITIONS = ("audio", "video", "audio_video")
COLUMNS = ("clip_id", "condition", "participant", "answer", "options")
LETTERS = string.ascii_uppercase


class HumanResponseError(ValueError):
    """A response file that cannot be read as it claims: names the file, the line and the reason."""


@dataclasses.dataclass
class HumanResponses:
    """Checked responses: one dict per answer (clip_id, condition, participant, chosen class name,
    true class name, correct), and the rows of clips the run does not know, per clip id."""

    path: str
    rows: list[dict]
    unknown_clips: dict[str, int]

    @property
    def num_unknown(self) -> int:
        return sum(self.unknown_clips.values())


def read_responses(path, truth: Mapping[str, str], classes: Sequence[str]) -> HumanResponses:
    """Responses of `path` checked against the run's clips (`truth`: clip id -> true class name)."""
    known = set(classes)
    rows, unknown = [], {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise HumanResponseError(f"{path}: line 1: missing column(s) {missing}; expected {list(COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            where = f"{path}: line {line}"
            if None in row or any(row[c] is None for c in COLUMNS):
                raise HumanResponseError(f"{where}: expected {len(reader.fieldnames)} fields, got another count")
            clip, condition = row["clip_id"].strip(), row["condition"].strip()
            participant, answer = row["participant"].strip(), row["answer"].strip()
            if not clip or not participant or not answer:
                raise HumanResponseError(f"{where}: empty clip_id, participant or answer")
            if condition not in CONDITIONS:
                raise HumanResponseError(f"{where}: condition {condition!r} is not one of {CONDITIONS}")
            options = [o.strip() for o in row["options"].split("|")]
            if len(options) < 2 or any(not o for o in options) or len(set(options)) < len(options):
                raise HumanResponseError(f"{where}: options {row['options']!r} are not 2 or more distinct names")
            strangers = [o for o in options if o not in known]
            if strangers:
                raise HumanResponseError(f"{where}: option(s) {strangers} are not classes of the run")
            if len(answer) == 1 and answer.upper() in LETTERS[:len(options)]:
                chosen = options[LETTERS.index(answer.upper())]
            elif answer in options:
                chosen = answer
            else:
                raise HumanResponseError(f"{where}: answer {answer!r} is neither a letter of the {len(options)} "
                                         "options nor one of them")
            if clip not in truth:
                unknown[clip] = unknown.get(clip, 0) + 1
                continue
            if truth[clip] not in options:
                raise HumanResponseError(f"{where}: clip {clip}'s class {truth[clip]!r} is not among its options")
            rows.append({"clip_id": clip, "condition": condition, "participant": participant, "chosen": chosen,
                         "truth": truth[clip], "correct": chosen == truth[clip]})
    return HumanResponses(str(path), rows, unknown)


def accuracy_by_condition(responses: HumanResponses) -> dict[str, dict]:
    """Per condition: accuracy over all answers, answers, participants, and per class."""
    out = {}
    for condition in CONDITIONS:
        rows = [r for r in responses.rows if r["condition"] == condition]
        if not rows:
            continue
        per_class = {}
        for name in sorted({r["truth"] for r in rows}):
            hits = [r["correct"] for r in rows if r["truth"] == name]
            per_class[name] = {"accuracy": float(np.mean(hits)), "correct": int(np.sum(hits)), "total": len(hits)}
        out[condition] = {"overall": float(np.mean([r["correct"] for r in rows])), "responses": len(rows),
                          "participants": len({r["participant"] for r in rows}),
                          "clips": len({r["clip_id"] for r in rows}), "per_class": per_class}
    return out


def majority_answers(responses: HumanResponses, condition: str) -> dict[str, str]:
    """Per clip, the class most participants chose in `condition` (ties: the first in name order)."""
    votes: dict[str, dict[str, int]] = {}
    for r in responses.rows:
        if r["condition"] == condition:
            clip = votes.setdefault(r["clip_id"], {})
            clip[r["chosen"]] = clip.get(r["chosen"], 0) + 1
    return {c: min(v, key=lambda name: (-v[name], name)) for c, v in votes.items()}


_MODALITIES = {"audio": ("audio",), "video": ("visual",), "audio_video": ("audio", "visual")}


def designed_accuracy(design_row: Mapping, condition: str) -> float:
    """What the toy world's design lets a perfect listener / viewer get right on a class: its pair
    Bayes accuracy in that modality; with both, the better of the two."""
    audio, visual = design_row["audio_pair_bayes_accuracy"], design_row["visual_pair_bayes_accuracy"]
    return {"audio": audio, "video": visual, "audio_video": max(audio, visual)}[condition]


def simulate(clips: Sequence[tuple[str, str, Sequence[str]]], design_rows: Sequence[Mapping], *,
             participants: int = 12, seed: int = 0, skill_sd: float = 0.05, lapse: float = 0.03,
             conditions: Sequence[str] = CONDITIONS) -> str:
    """Simulated responses, as a response file's text: every participant answers every clip (id, true class,
    shown options) in every condition. A participant's chance of a right answer on a class is its
    designed accuracy (`designed_accuracy`) times (1 - lapse), plus their own skill offset
    (normal, sd `skill_sd`), clipped to [0, 1]. A wrong answer is the class the design makes it
    sound or look like in that condition (its `audio_partner` / `visual_partner`) when that is
    shown, else another option at random."""
    design = {row["class"]: row for row in design_rows}
    rng = np.random.default_rng(seed)
    skills = rng.normal(0.0, skill_sd, participants)
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for condition in conditions:
        for who, skill in enumerate(skills):
            for clip, truth, options in clips:
                options = list(options)
                right = rng.random() < np.clip(designed_accuracy(design[truth], condition) * (1 - lapse) + skill,
                                               0.0, 1.0)
                partners = [design[truth].get(f"{m}_partner") for m in _MODALITIES[condition]]
                partners = [options.index(name) for name in partners if name in options]
                others = [i for i, o in enumerate(options) if o != truth]
                choice = options.index(truth) if right else int(rng.choice(partners or others))
                writer.writerow([clip, condition, f"sim{who:02d}", LETTERS[choice], "|".join(options)])
    return out.getvalue()
