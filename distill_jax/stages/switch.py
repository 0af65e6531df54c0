"""Switch: the Cnn14 switch trained on the analysis split from the two models' answers.

Labels come from the evaluate stage's records of the teacher and the student on
`config.switch.split` (`train.switch.make_labels`: per clip, or per class); the switch
(Cnn14: a PANN checkpoint, or the toy world's tiny random-init one) learns to predict them from
the audio. Its accuracy is measured on `config.switch.eval_split`, labelled the same way.
Writes switch/model (orbax) and switch/metrics.json.
"""
from __future__ import annotations

import json
import os

import numpy as np

from distill_jax.models.cnn14 import Cnn14Config
from distill_jax.stages.evaluate import read_records
from distill_jax.train import switch as switch_lib


def switch_config(study) -> tuple[switch_lib.SwitchConfig, object]:
    """(SwitchConfig, pretrained backbone or None) from config.switch."""
    cfg = study.config.switch
    backbone = None
    if os.path.exists(cfg.backbone):
        from distill_jax.convert import load_pann

        backbone = load_pann(cfg.backbone)
        backbone_config = backbone.config
    else:
        backbone_config = Cnn14Config.preset(cfg.backbone)
    config = switch_lib.SwitchConfig(
        backbone=backbone_config, finetune=cfg.finetune, label_mode=cfg.label_mode, sample_rule=cfg.sample_rule,
        class_margin=cfg.class_margin, threshold=cfg.threshold, learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size, epochs=cfg.epochs, seed=study.config.seed)
    return config, backbone


def waveforms(study, split: str) -> tuple[list[str], np.ndarray]:
    """(clip ids, waveforms [clips, samples] at 16 kHz) of every clip of `split`."""
    ids, waves = [], []
    for batch in study.dataset("waveform", split, batch_size=study.config.switch.batch_size):
        keep = np.flatnonzero(batch["valid"])
        ids += [str(c) for c in batch["clip_id"][keep]]
        waves.append(batch["waveform"][keep])
    return ids, np.concatenate(waves)


def answers(study, split: str, clip_ids) -> dict:
    """truth / teacher / student answers and classes of `split`'s clips, in `clip_ids` order."""
    tables = {}
    for role, modality in (("teacher", study.teacher), ("student", study.student)):
        path = study.records_path(modality, split)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: the switch needs the {modality} model's answers on {split!r} "
                                    f"(add it to config.evaluate.splits and run the evaluate stage)")
        tables[role] = {r["clip_id"]: r for r in read_records(path)}
    missing = [c for c in clip_ids if c not in tables["teacher"] or c not in tables["student"]]
    if missing:
        raise ValueError(f"{len(missing)} clips of {split!r} have no records, e.g. {missing[:5]}")
    teacher = [tables["teacher"][c] for c in clip_ids]
    student = [tables["student"][c] for c in clip_ids]
    return {"truth": [r["answer"] for r in teacher], "teacher_answers": [r["predicted"] for r in teacher],
            "student_answers": [r["predicted"] for r in student], "classes": [r["label"] for r in teacher]}


def labels_for(study, config, split: str):
    ids, waves = waveforms(study, split)
    return ids, waves, switch_lib.make_labels(config, **answers(study, split, ids))


def run(study) -> None:
    out = study.path("switch")
    if os.path.exists(os.path.join(out, "metrics.json")):
        print(f"switch: {out} exists, skipped")
        return
    cfg = study.config.switch
    config, backbone = switch_config(study)
    _, train_waves, train_labels = labels_for(study, config, cfg.split)
    _, eval_waves, eval_labels = labels_for(study, config, cfg.eval_split)
    print(f"switch: {len(train_labels)} clips of {cfg.split!r}, {int(np.sum(train_labels))} where the "
          f"{study.teacher} teacher is the better source", flush=True)
    os.makedirs(out, exist_ok=True)
    if np.all(train_labels == train_labels[0]):
        # Nothing to learn: the switch is the constant answer (reported as such, not trained).
        constant = int(train_labels[0])
        report = {"constant": constant, "train_split": cfg.split, "eval_split": cfg.eval_split,
                  "label_mode": cfg.label_mode, "train": {"clips": len(train_labels), "positives": int(np.sum(train_labels))},
                  "eval": switch_lib.binary_metrics(eval_labels, np.full(len(eval_labels), float(constant)),
                                                    config.threshold)}
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(f"switch: WARNING every {cfg.split} label is {constant}: no switch is trained, its answer is the "
              f"constant {constant} (accuracy on {cfg.eval_split} {report['eval']['accuracy']:.3f})", flush=True)
        return
    switch, report = switch_lib.train_switch(config, train_waves, train_labels, sample_rate=16000,
                                             eval_waveforms=eval_waves, eval_labels=eval_labels, backbone=backbone,
                                             log=lambda line: print(line, flush=True))
    switch_lib.save_switch(switch, os.path.join(out, "model"))
    report.update(train_split=cfg.split, eval_split=cfg.eval_split, label_mode=cfg.label_mode,
                  majority_eval_accuracy=float(max(np.mean(eval_labels), 1 - np.mean(eval_labels))))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"switch: accuracy on {cfg.eval_split} {report['eval']['accuracy']:.3f} "
          f"(always-majority {report['majority_eval_accuracy']:.3f})", flush=True)
