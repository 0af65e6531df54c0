"""Switch: the Cnn14 switch trained on the analysis split from the two models' answers.

What it sees is `config.switch.inputs`; `config.switch.variants` lists further switches trained
beside it (the paper's open question: would an audio-visual switch decide better?):
- "audio": the Cnn14 on the clip's audio (the paper's switch);
- "audio_visual": + the visual model's pooled vision-tower embedding of the clip (frozen; scored
  once per split into switch/visual_embedding/<split>.jsonl);
- "confidence": + both models' letter-distribution features on the clip (`CONFIDENCE_FEATURES`),
  from their records (eval/ on the switch's splits, labels/ on the training split).
The main switch writes switch/{model, probs-<split>.jsonl, metrics.json}, a variant the same
under switch/variants/<inputs>/; the label stage turns each variant into a distillation mode
"learned_<inputs>" (`variant_mode`).

Labels come from the evaluate stage's records of the teacher and the student on
`config.switch.split` (`train.switch.make_labels`: per clip, or per class); the switch
(Cnn14: a PANN checkpoint, or the toy world's tiny random-init one) learns to predict them from
the audio. Its accuracy is measured on `config.switch.eval_split`, labelled the same way.
The split's clips are held in memory on every host (the analysis set is small) and the switch
trains through the trainer (`train.loop`, `train.switch.fit`). Writes switch/model (orbax), switch/probs-<split>.jsonl and switch/metrics.json.
"""
from __future__ import annotations

import base64

import numpy as np

from distill_jax import multihost, scoring
from distill_jax.models.cnn14 import Cnn14Config
from distill_jax.stages.evaluate import read_records
from distill_jax.train import switch as switch_lib


INPUTS = ("audio", "audio_visual", "confidence")
CONFIDENCE_FEATURES = ("teacher max probability", "teacher top-2 margin", "teacher entropy",
                       "student max probability", "student top-2 margin", "student entropy", "answers agree")


def switch_inputs(study) -> list[str]:
    """The switches a run trains: config.switch.inputs first, then each variant."""
    cfg = study.config.switch
    return list(dict.fromkeys([cfg.inputs, *cfg.variants]))


def switch_dir(study, inputs: str):
    return study.path("switch") if inputs == study.config.switch.inputs else study.path("switch", "variants", inputs)


def variant_mode(study, inputs: str) -> str:
    """The distillation mode whose labels come from the `inputs` switch: "learned" for the main one."""
    return "learned" if inputs == study.config.switch.inputs else f"learned_{inputs}"


def confidence_features(teacher_logits, student_logits) -> np.ndarray:
    """[clips, 7] float32: per model the max letter probability, the top-2 margin and the entropy
    (nats) of its letter distribution, then whether the two models' answers agree."""
    def per_model(logits):
        logits = np.asarray(logits, np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.sort(p, -1)
        entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)
        return [top[:, -1], top[:, -1] - top[:, -2], entropy]

    agree = np.argmax(teacher_logits, -1) == np.argmax(student_logits, -1)
    return np.stack([*per_model(teacher_logits), *per_model(student_logits), agree], 1).astype(np.float32)


def letter_records(study, name: str, split: str) -> dict[str, dict]:
    """{clip id: record} of `name`'s letter scores on `split`: the evaluate stage's, or on the
    training split the label stage's."""
    for path in (study.records_path(name, split), study.path("labels", f"{name}-{split}.jsonl")):
        if path.exists():
            return {r["clip_id"]: r for r in read_records(path)}
    raise FileNotFoundError(f"{study.records_path(name, split)}: the switch needs the {name} model's answers on "
                            f"{split!r} (add it to config.evaluate.splits and run the evaluate stage; on the "
                            f"training split the label stage writes labels/{name}-{split}.jsonl)")


def paired_records(study, split: str) -> tuple[list[str], list[dict], list[dict]]:
    """(clip ids, the teacher's records, the student's records) of `split`, in the teacher's order;
    records of different clips are an error."""
    teacher, student = letter_records(study, study.teacher, split), letter_records(study, study.student, split)
    clip_ids = list(teacher)
    missing = [c for c in clip_ids if c not in student]
    if missing or len(student) != len(clip_ids):
        raise ValueError(f"the teacher's and the student's records of {split!r} hold different clips, "
                         f"e.g. {missing[:5]}")
    return clip_ids, [teacher[c] for c in clip_ids], [student[c] for c in clip_ids]


def _encode(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def visual_embeddings(study, split: str) -> dict[str, np.ndarray]:
    """{clip id: the visual model's pooled vision-tower embedding} of `split`, scored once on every
    host into switch/visual_embedding/<split>.jsonl (float32 in base64: 19 KB a clip at 7B width, 3584)."""
    path = study.path("switch", "visual_embedding", f"{split}.jsonl")
    if not path.exists():
        model = study.load_model("visual")
        transform = study.transform("visual")
        batch_size = study.config.evaluate.batch_size
        scoring.score_split(
            study.dataset("visual", split, batch_size=batch_size), scoring.pooled_vision_scorer(model, study.mesh),
            lambda batch, row, vector: {"clip_id": str(batch["clip_id"][row]), "embedding": _encode(vector)}, path,
            mesh=study.mesh, num_batches=scoring.num_batches(study.num_examples(split), batch_size),
            static_inputs=transform.static_inputs, desc=f"visual embeddings of {split}",
            observe=study.observer("visual", "embed", split))
        study.input_log.save()
        del model
    return {r["clip_id"]: np.frombuffer(base64.b64decode(r["embedding"]), "<f4") for r in read_records(path)}


def side_features(study, inputs: str, split: str) -> dict[str, np.ndarray] | None:
    """{clip id: the `inputs` switch's side features} of every clip of `split` (None for "audio")."""
    if inputs == "audio":
        return None
    if inputs == "audio_visual":
        return visual_embeddings(study, split)
    clip_ids, teacher, student = paired_records(study, split)
    features = confidence_features([r["letter_logits"] for r in teacher], [r["letter_logits"] for r in student])
    return dict(zip(clip_ids, features))


class JoinFeatures:
    """Grain step (`Study.dataset(targets=...)`): a clip's switch side features by clip id."""

    def __init__(self, features: dict[str, np.ndarray]):
        self.features = features

    def __call__(self, example: dict) -> dict:
        vector = self.features.get(str(example["clip_id"]))
        if vector is None:
            raise KeyError(f"clip {example['clip_id']} has no switch side features")
        return {"switch_features": np.asarray(vector, np.float32)}


def switch_config(study, inputs: str = "audio", feature_dim: int = 0) -> tuple[switch_lib.SwitchConfig, object]:
    """(SwitchConfig, pretrained backbone or None) from config.switch, for the `inputs` switch."""
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
        max_nonfinite_steps=cfg.max_nonfinite_steps, feature_dim=feature_dim)
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
    clip_ids, teacher, student = paired_records(study, split)
    return clip_ids, {"truth": [r["answer"] for r in teacher], "teacher_answers": [r["predicted"] for r in teacher],
                      "student_answers": [r["predicted"] for r in student], "classes": [r["label"] for r in teacher]}


def labels_for(study, config, split: str) -> tuple[list[str], np.ndarray]:
    ids, table = answers(study, split)
    return ids, switch_lib.make_labels(config, **table)


def probabilities(study, compute, split: str, out_path, *, batch_size: int,
                  features: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Switch probability per clip of `split` from `compute` (`probability_scorer`, or a constant
    switch) and the clips' side `features` when it takes them, scored on every host and written
    once to `out_path` (JSON lines)."""
    join = None if features is None or out_path.exists() else JoinFeatures(features)
    records = scoring.score_split(
        study.dataset("waveform", split, batch_size=batch_size, targets=join), compute,
        lambda batch, row, prob: {"clip_id": str(batch["clip_id"][row]), "prob": float(prob)}, out_path,
        mesh=study.mesh, num_batches=scoring.num_batches(study.num_examples(split), batch_size),
        desc=f"switch on {split}", observe=study.observer("switch", "score", split, "waveform"))
    study.input_log.save()
    return {r["clip_id"]: r["prob"] for r in records}


def run(study) -> None:
    """Train the main switch and each variant (`switch_inputs`); one that has its metrics is skipped."""
    for inputs in switch_inputs(study):
        run_one(study, inputs)


def run_one(study, inputs: str) -> None:
    out = switch_dir(study, inputs)
    if (out / "metrics.json").exists():
        print(f"switch: {out} exists, skipped")
        return
    cfg = study.config.switch
    train_features = side_features(study, inputs, cfg.split)
    feature_dim = 0 if train_features is None else len(next(iter(train_features.values())))
    config, backbone = switch_config(study, inputs, feature_dim)
    train_ids, train_labels = labels_for(study, config, cfg.split)
    eval_ids, eval_labels = labels_for(study, config, cfg.eval_split)
    print(f"switch ({inputs}): {len(train_labels)} clips of {cfg.split!r}, {int(np.sum(train_labels))} where the "
          f"{study.teacher} teacher is the better source", flush=True)
    common = {"inputs": inputs, "train_split": cfg.split, "eval_split": cfg.eval_split, "label_mode": cfg.label_mode}
    if np.all(train_labels == train_labels[0]):
        # Nothing to learn: the switch is the constant answer (reported as such, not trained).
        constant = int(train_labels[0])
        report = {"constant": constant, **common,
                  "train": {"clips": len(train_labels), "positives": int(np.sum(train_labels))},
                  "eval": switch_lib.binary_metrics(eval_labels, np.full(len(eval_labels), float(constant)),
                                                    config.threshold)}
        multihost.write_json(out / "metrics.json", report, indent=1)
        print(f"switch ({inputs}): WARNING every {cfg.split} label is {constant}: no switch is trained, its answer "
              f"is the constant {constant} (accuracy on {cfg.eval_split} {report['eval']['accuracy']:.3f})",
              flush=True)
        return
    clip_ids, waves = waveforms(study, cfg.split)
    by_clip = dict(zip(train_ids, train_labels.tolist()))
    features = None if train_features is None else np.stack([train_features[c] for c in clip_ids])
    switch, report = switch_lib.fit(config, waves, np.asarray([by_clip[c] for c in clip_ids]), mesh=study.mesh,
                                    backbone=backbone, sample_rate=16000, features=features,
                                    log=lambda line: print(line, flush=True))
    switch_lib.save_switch(switch, out / "model")
    compute = switch_lib.probability_scorer(switch, study.mesh)
    for name, split, ids, labels in (("train", cfg.split, train_ids, train_labels),
                                     ("eval", cfg.eval_split, eval_ids, eval_labels)):
        probs = probabilities(study, compute, split, out / f"probs-{split}.jsonl", batch_size=cfg.batch_size,
                              features=train_features if split == cfg.split else side_features(study, inputs, split))
        report[name] = switch_lib.binary_metrics(labels, np.asarray([probs[c] for c in ids]), config.threshold)
    report.update(common, majority_eval_accuracy=float(max(np.mean(eval_labels), 1 - np.mean(eval_labels))))
    multihost.write_json(out / "metrics.json", report, indent=1)
    print(f"switch ({inputs}): accuracy on {cfg.eval_split} {report['eval']['accuracy']:.3f} "
          f"(always-majority {report['majority_eval_accuracy']:.3f})", flush=True)
