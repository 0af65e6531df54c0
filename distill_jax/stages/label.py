"""Label: per training clip, the teacher's letter and 10-way letter logits, the student's own
original answer, the switch's probability, and whether the switch is closed (teacher used).

Switch modes: "learned" (the Cnn14 switch: prob >= threshold), "always" (distil every clip),
"never" (only anti-forgetting), "oracle" (ground truth: the teacher right and the student
wrong; toy world only, an upper bound); and "learned_<inputs>" for each switch variant
(config.switch.variants, stages/switch.py), labelled as "learned" from that switch.
`JoinTargets` joins a mode's label records to the distillation's input pipeline by clip id.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from distill_jax import multihost

SWITCH_MODES = ("learned", "always", "never", "oracle")


def make_labels(teacher: Sequence[dict], student: Sequence[dict], *, mode: str = "learned",
                switch_probs: Mapping[str, float] | None = None, threshold: float = 0.5) -> list[dict]:
    """Label records keyed by clip id, from the evaluate stage's records of both models on one split."""
    if mode.startswith("learned_"):
        mode = "learned"  # a switch variant's probabilities
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


class JoinTargets:
    """Grain step (`pipeline.make_dataset(targets=...)`): a clip's distillation targets from its
    label record, joined by clip id. A clip without a record is an error naming it."""

    def __init__(self, labels: Mapping[str, dict]):
        self.labels = {str(k): v for k, v in labels.items()}

    def __call__(self, example: dict) -> dict:
        record = self.labels.get(str(example["clip_id"]))
        if record is None:
            raise KeyError(f"clip {example['clip_id']} has no label record: was the label stage run on this split?")
        return {"switch_closed": np.bool_(record["switch_closed"]), "teacher_letter": np.int32(record["teacher_letter"]),
                "teacher_logits": np.asarray(record["teacher_logits"], np.float32),
                "student_letter": np.int32(record["student_letter"])}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def switch_probabilities(study, split: str, out_path, inputs: str | None = None) -> dict[str, float]:
    """The trained `inputs` switch's (default: the main one's) probability per clip of `split`
    (records written once, JSON lines)."""
    from distill_jax.stages.switch import probabilities, side_features, switch_dir
    from distill_jax.train.switch import probability_scorer, restore_switch

    inputs = inputs or study.config.switch.inputs
    directory = switch_dir(study, inputs)
    constant = multihost.read_json(directory / "metrics.json").get("constant")
    features = None
    if constant is not None:  # the switch stage found one-sided labels: a constant switch
        compute = lambda batch, static: jax.numpy.full(batch["waveform"].shape[:1], float(constant))
    else:
        compute = probability_scorer(restore_switch(directory / "model", study.mesh), study.mesh)
        if not out_path.exists():
            features = side_features(study, inputs, split)
    return probabilities(study, compute, split, out_path, batch_size=study.config.label.batch_size,
                         features=features)


def labels_path(study, mode: str):
    return study.path("labels", f"{mode}.jsonl")


def distill_modes(study) -> list[str]:
    """config.distill.modes, then "learned_<inputs>" for each switch variant (when "learned" is a mode)."""
    from distill_jax.stages.switch import switch_inputs, variant_mode

    modes = list(study.config.distill.modes)
    if "learned" in modes:
        modes += [variant_mode(study, inputs) for inputs in switch_inputs(study)[1:]]
    return modes


def run(study) -> None:
    """Teacher and student records on the training split (resumable parts, progress bar), the
    switch's probabilities, and one label file per switch mode in config.distill.modes."""
    from distill_jax.stages.evaluate import read_records, score_model, write_records

    cfg, split = study.config.label, study.config.label.split
    records = {}
    for modality in (study.teacher, study.student):
        path = study.path("labels", f"{modality}-{split}.jsonl")
        if not path.exists():
            score_model(study, study.load_model(modality), modality, split, path,
                        batch_size=study.scoring_batch_size(modality, cfg.batch_size), chunk_batches=cfg.chunk_batches)
        records[modality] = read_records(path)
    from distill_jax.stages.switch import switch_inputs, variant_mode

    probs = {}  # mode -> its switch's probabilities; the control modes record the main switch's
    if "learned" in study.config.distill.modes:
        for inputs in switch_inputs(study):
            mode = variant_mode(study, inputs)
            name = "switch" if mode == "learned" else f"switch_{inputs}"
            if mode == "learned" or not labels_path(study, mode).exists():
                probs[mode] = switch_probabilities(study, split, study.path("labels", f"{name}-{split}.jsonl"), inputs)
    for mode in distill_modes(study):
        path = labels_path(study, mode)
        if path.exists():
            print(f"label: {path} exists, skipped")
            continue
        labels = make_labels(records[study.teacher], records[study.student], mode=mode,
                             switch_probs=probs.get(mode, probs.get("learned")),
                             threshold=study.config.switch.threshold)
        write_records(path, labels)
        closed = np.mean([r["switch_closed"] for r in labels])
        print(f"label: {mode}: teacher used on {100 * closed:.1f}% of {len(labels)} {split} clips", flush=True)
