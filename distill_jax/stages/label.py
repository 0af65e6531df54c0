"""Label: per training clip, the teacher's letter and 10-way letter logits, the student's own
original answer, the switch's probability, and whether the switch is closed (teacher used).

Switch modes: "learned" (the Cnn14 switch: prob >= threshold), "always" (distil every clip),
"never" (only anti-forgetting), "oracle" (ground truth: the teacher right and the student
wrong; toy world only, an upper bound). `targets_for` turns label records into the
train step's target arrays for a batch of clip ids.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SWITCH_MODES = ("learned", "always", "never", "oracle")


def make_labels(teacher: Sequence[dict], student: Sequence[dict], *, mode: str = "learned",
                switch_probs: Mapping[str, float] | None = None, threshold: float = 0.5) -> list[dict]:
    """Label records keyed by clip id, from the evaluate stage's records of both models on one split."""
    if mode not in SWITCH_MODES:
        raise ValueError(f"switch mode must be one of {SWITCH_MODES}, got {mode!r}")
    if mode == "learned" and switch_probs is None:
        raise ValueError("switch mode 'learned' needs the switch's probabilities")
    students = {r["clip_id"]: r for r in student}
    missing = [r["clip_id"] for r in teacher if r["clip_id"] not in students]
    if missing or len(students) != len(teacher):
        raise ValueError(f"teacher and student scored different clips ({len(teacher)} vs {len(students)}; "
                         f"e.g. missing from the student: {missing[:5]})")
    labels = []
    for t in teacher:
        s = students[t["clip_id"]]
        prob = None if switch_probs is None else float(switch_probs[t["clip_id"]])
        closed = {"learned": lambda: prob >= threshold, "always": lambda: True, "never": lambda: False,
                  "oracle": lambda: t["predicted"] == t["answer"] and s["predicted"] != s["answer"]}[mode]()
        labels.append({"clip_id": t["clip_id"], "teacher_letter": t["predicted"], "teacher_logits": t["letter_logits"],
                       "student_letter": s["predicted"], "switch_prob": prob, "switch_closed": bool(closed)})
    return labels


def targets_for(clip_ids: Sequence[str], valid: Sequence[int], labels: Mapping[str, dict]) -> dict:
    """The train step's `targets` for a batch: rows with valid == 0 get weight 0."""
    rows = []
    for clip_id, ok in zip(clip_ids, valid):
        if str(clip_id) not in labels:
            raise KeyError(f"clip {clip_id} has no label record: was the label stage run on this split?")
        rows.append(labels[str(clip_id)])
    return {"switch_closed": np.asarray([r["switch_closed"] for r in rows]),
            "teacher_letter": np.asarray([r["teacher_letter"] for r in rows], np.int32),
            "teacher_logits": np.asarray([r["teacher_logits"] for r in rows], np.float32),
            "student_letter": np.asarray([r["student_letter"] for r in rows], np.int32),
            "weight": np.asarray(valid, np.float32)}
