"""Switch: the Cnn14 switch trained on the analysis split from the two models' answers.

Labels come from the evaluate stage's records of the teacher and the student on
`config.switch.split` (`train.switch.make_labels`: per clip, or per class); the switch
(Cnn14: a PANN checkpoint, or the toy world's tiny random-init one) learns to predict them from
the audio. Its accuracy is measured on `config.switch.eval_split`, labelled the same way.
The split's clips are held in memory on every host (the analysis set is small) and the switch
trains through the trainer (`train.loop`, `train.switch.fit`). Writes switch/model (orbax), switch/probs-<split>.jsonl and switch/metrics.json.
"""
from __future__ import annotations

import numpy as np

from distill_jax import multihost, scoring
from distill_jax.models.cnn14 import Cnn14Config
from distill_jax.stages.evaluate import read_records
from distill_jax.train import switch as switch_lib


def switch_config(study) -> tuple[switch_lib.SwitchConfig, object]:
    """(SwitchConfig, pretrained backbone or None) from config.switch."""
    cfg = study.config.switch
    backbone = None
    if multihost.path(cfg.backbone).exists():
        from distill_jax.convert import load_pann

        backbone = load_pann(multihost.local_file(cfg.backbone))
        backbone_config = backbone.config
    else:
        backbone_config = Cnn14Config.preset(cfg.backbone)
    config = switch_lib.SwitchConfig(
        backbone=backbone_config, finetune=cfg.finetune, label_mode=cfg.label_mode, sample_rule=cfg.sample_rule,
        class_margin=cfg.class_margin, threshold=cfg.threshold, learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size, epochs=cfg.epochs, seed=study.config.seed,
        max_nonfinite_steps=cfg.max_nonfinite_steps)
    return config, backbone


def waveforms(study, split: str) -> tuple[list[str], np.ndarray]:
    """(clip ids, waveforms [clips, samples] at 16 kHz) of every clip of `split`, on every host
    (the switch's splits are small: the paper's analysis set)."""
    ids, waves = [], []
    for batch in study.dataset("waveform", split, batch_size=study.config.switch.batch_size, all_hosts=True):
        keep = np.flatnonzero(batch["valid"])
        ids += [str(c) for c in batch["clip_id"][keep]]
        waves.append(batch["waveform"][keep])
    return ids, np.concatenate(waves)


def answers(study, split: str) -> tuple[list[str], dict]:
    """(clip ids, truth / teacher / student answers and classes in that order) of `split`."""
    tables = {}
    for role, modality in (("teacher", study.teacher), ("student", study.student)):
        path = study.records_path(modality, split)
        if not path.exists():
            raise FileNotFoundError(f"{path}: the switch needs the {modality} model's answers on {split!r} "
                                    f"(add it to config.evaluate.splits and run the evaluate stage)")
        tables[role] = {r["clip_id"]: r for r in read_records(path)}
    clip_ids = list(tables["teacher"])
    missing = [c for c in clip_ids if c not in tables["student"]]
    if missing or len(tables["student"]) != len(clip_ids):
        raise ValueError(f"the teacher's and the student's records of {split!r} hold different clips, "
                         f"e.g. {missing[:5]}")
    teacher = [tables["teacher"][c] for c in clip_ids]
    student = [tables["student"][c] for c in clip_ids]
    return clip_ids, {"truth": [r["answer"] for r in teacher], "teacher_answers": [r["predicted"] for r in teacher],
                      "student_answers": [r["predicted"] for r in student], "classes": [r["label"] for r in teacher]}


def labels_for(study, config, split: str) -> tuple[list[str], np.ndarray]:
    ids, table = answers(study, split)
    return ids, switch_lib.make_labels(config, **table)


def probabilities(study, compute, split: str, out_path, *, batch_size: int) -> dict[str, float]:
    """Switch probability per clip of `split` from `compute` (`probability_scorer`, or a constant
    switch), scored on every host and written once to `out_path` (JSON lines)."""
    records = scoring.score_split(
        study.dataset("waveform", split, batch_size=batch_size), compute,
        lambda batch, row, prob: {"clip_id": str(batch["clip_id"][row]), "prob": float(prob)}, out_path,
        mesh=study.mesh, num_batches=scoring.num_batches(study.num_examples(split), batch_size),
        desc=f"switch on {split}")
    return {r["clip_id"]: r["prob"] for r in records}


def run(study) -> None:
    out = study.path("switch")
    if (out / "metrics.json").exists():
        print(f"switch: {out} exists, skipped")
        return
    cfg = study.config.switch
    config, backbone = switch_config(study)
    train_ids, train_labels = labels_for(study, config, cfg.split)
    eval_ids, eval_labels = labels_for(study, config, cfg.eval_split)
    print(f"switch: {len(train_labels)} clips of {cfg.split!r}, {int(np.sum(train_labels))} where the "
          f"{study.teacher} teacher is the better source", flush=True)
    if np.all(train_labels == train_labels[0]):
        # Nothing to learn: the switch is the constant answer (reported as such, not trained).
        constant = int(train_labels[0])
        report = {"constant": constant, "train_split": cfg.split, "eval_split": cfg.eval_split,
                  "label_mode": cfg.label_mode, "train": {"clips": len(train_labels), "positives": int(np.sum(train_labels))},
                  "eval": switch_lib.binary_metrics(eval_labels, np.full(len(eval_labels), float(constant)),
                                                    config.threshold)}
        multihost.write_json(out / "metrics.json", report, indent=1)
        print(f"switch: WARNING every {cfg.split} label is {constant}: no switch is trained, its answer is the "
              f"constant {constant} (accuracy on {cfg.eval_split} {report['eval']['accuracy']:.3f})", flush=True)
        return
    clip_ids, waves = waveforms(study, cfg.split)
    by_clip = dict(zip(train_ids, train_labels.tolist()))
    switch, report = switch_lib.fit(config, waves, np.asarray([by_clip[c] for c in clip_ids]), mesh=study.mesh,
                                    backbone=backbone, sample_rate=16000, log=lambda line: print(line, flush=True))
    switch_lib.save_switch(switch, out / "model")
    compute = switch_lib.probability_scorer(switch, study.mesh)
    for name, split, ids, labels in (("train", cfg.split, train_ids, train_labels),
                                     ("eval", cfg.eval_split, eval_ids, eval_labels)):
        probs = probabilities(study, compute, split, out / f"probs-{split}.jsonl", batch_size=cfg.batch_size)
        report[name] = switch_lib.binary_metrics(labels, np.asarray([probs[c] for c in ids]), config.threshold)
    report.update(train_split=cfg.split, eval_split=cfg.eval_split, label_mode=cfg.label_mode,
                  majority_eval_accuracy=float(max(np.mean(eval_labels), 1 - np.mean(eval_labels))))
    multihost.write_json(out / "metrics.json", report, indent=1)
    print(f"switch: accuracy on {cfg.eval_split} {report['eval']['accuracy']:.3f} "
          f"(always-majority {report['majority_eval_accuracy']:.3f})", flush=True)
