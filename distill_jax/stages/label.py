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


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def switch_probabilities(study, split: str, out_path: str) -> dict[str, float]:
    """The trained switch's probability per clip of `split`, batch by batch (written once, JSON)."""
    import json
    import os

    import tqdm

    from distill_jax.train.switch import make_predict, restore_switch

    if os.path.exists(out_path):
        with open(out_path) as f:
            return json.load(f)
    with open(study.path("switch", "metrics.json")) as f:
        constant = json.load(f).get("constant")
    batch_size = study.config.label.batch_size
    if constant is not None:  # the switch stage found one-sided labels: a constant switch
        predict = lambda waveforms: np.full(len(waveforms), float(constant))
    else:
        predict = make_predict(restore_switch(study.path("switch", "model")), batch_size=batch_size,
                               sample_rate=16000)
    probs = {}
    total = -(-study.num_examples(split) // batch_size)
    for batch in tqdm.tqdm(study.dataset("waveform", split, batch_size=batch_size), total=total,
                           desc=f"switch on {split}", leave=False):
        p = predict(batch["waveform"])
        for row in np.flatnonzero(batch["valid"]):
            probs[str(batch["clip_id"][row])] = float(p[row])
    with open(out_path + ".tmp", "w") as f:
        json.dump(probs, f)
    os.replace(out_path + ".tmp", out_path)
    return probs


def labels_path(study, mode: str) -> str:
    return study.path("labels", f"{mode}.jsonl")


def run(study) -> None:
    """Teacher and student records on the training split (resumable parts, progress bar), the
    switch's probabilities, and one label file per switch mode in config.distill.modes."""
    import os

    from distill_jax.stages.evaluate import read_records, score_split, write_records

    cfg, split = study.config.label, study.config.label.split
    records = {}
    for modality in (study.teacher, study.student):
        path = study.path("labels", f"{modality}-{split}.jsonl")
        if not os.path.exists(path):
            score_split(study, study.load_model(modality), modality, split, path, batch_size=cfg.batch_size,
                        chunk_batches=cfg.chunk_batches)
        records[modality] = read_records(path)
    modes = list(study.config.distill.modes)
    probs = None
    if "learned" in modes:
        probs = switch_probabilities(study, split, study.path("labels", f"switch-{split}.json"))
    for mode in modes:
        path = labels_path(study, mode)
        if os.path.exists(path):
            print(f"label: {path} exists, skipped")
            continue
        labels = make_labels(records[study.teacher], records[study.student], mode=mode, switch_probs=probs,
                             threshold=study.config.switch.threshold)
        write_records(path, labels)
        closed = np.mean([r["switch_closed"] for r in labels])
        print(f"label: {mode}: teacher used on {100 * closed:.1f}% of {len(labels)} {split} clips", flush=True)
