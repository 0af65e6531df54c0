"""Evaluate: every clip of a split scored by letter logits, accuracy overall and per class, and the
modality-gap table (per class: audio model, visual model, difference).

Per-clip answers are saved as JSON lines (clip id, true class, the answer letter's index, the
ten letter logits, the predicted index), so later stages (switch labels, distillation
targets, the report) read them instead of scoring again.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distill_jax import multihost, scoring


def accuracy(records: Sequence[dict], class_names: Sequence[str]) -> dict:
    """{"overall": acc, "num_clips": n, "per_class": {name: {"accuracy", "correct", "total"}}} (classes seen)."""
    if not records:
        raise ValueError("no scored clips: is the split empty?")
    correct = np.asarray([r["predicted"] == r["answer"] for r in records])
    labels = np.asarray([r["label"] for r in records])
    per_class = {}
    for index in np.unique(labels):
        hits = correct[labels == index]
        per_class[class_names[index]] = {"accuracy": float(hits.mean()), "correct": int(hits.sum()),
                                         "total": int(hits.size)}
    return {"overall": float(correct.mean()), "num_clips": int(correct.size), "per_class": per_class}


def modality_gap(audio: dict, visual: dict) -> list[dict]:
    """Per class seen by both: audio and visual accuracy and visual - audio, largest gap first."""
    rows = [{"class": name, "audio": audio["per_class"][name]["accuracy"],
             "visual": visual["per_class"][name]["accuracy"]}
            for name in audio["per_class"] if name in visual["per_class"]]
    for row in rows:
        row["difference"] = row["visual"] - row["audio"]
    return sorted(rows, key=lambda r: (-r["difference"], r["class"]))


def write_records(path, records: Sequence[dict]) -> None:
    """JSON lines, written atomically by process 0 (a finished file is complete)."""
    multihost.write_lines(path, records)


def read_records(path) -> list[dict]:
    return multihost.read_lines(path)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table; floats as percentages with one decimal."""
    fmt = lambda v: f"{100 * v:.1f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def score_model(study, model, modality: str, split: str, out_path, *, batch_size: int,
                chunk_batches: int = 0, name: str | None = None) -> list[dict]:
    """Per-clip letter records of `model` (`modality`'s; `name` in the input log, default the
    modality) on `split`, written to `out_path` (JSON lines; resumable by chunks of `chunk_batches`
    batches, see `scoring.score_split`)."""
    transform = study.transform(modality)
    compute = scoring.letter_scorer(model, study.letter_ids(modality), transform.model_inputs, study.mesh)
    records = scoring.score_split(study.dataset(modality, split, batch_size=batch_size), compute, scoring.letter_record,
                               out_path, mesh=study.mesh, num_batches=scoring.num_batches(study.num_examples(split),
                                                                                         batch_size),
                               chunk_batches=chunk_batches, static_inputs=transform.static_inputs,
                               desc=f"{modality} on {split}",
                               observe=study.observer(name or modality, "score", split, modality))
    study.input_log.save()
    return records


def summary(study, names: Sequence[str], splits: Sequence[str]) -> dict:
    """{name: {split: accuracy dict}} for every records file that exists."""
    out = {}
    for name in names:
        for split in splits:
            path = study.records_path(name, split)
            if path.exists():
                out.setdefault(name, {})[split] = accuracy(read_records(path), study.classes_of(split))
    return out


def scored_names(study) -> dict[str, list[str]]:
    """Model (config.models key) -> the records names the evaluate stage writes for it: the two
    modalities' models, and the audio-visual model once per condition when the run has one."""
    from distill_jax.stages.common import AUDIO_VISUAL, MODALITIES, audio_visual_name

    names = {m: [m] for m in MODALITIES}
    if study.audio_visual:
        names[AUDIO_VISUAL] = [audio_visual_name(c) for c in study.config.models[AUDIO_VISUAL].conditions]
    return names


def run(study) -> None:
    from distill_jax.stages.common import AUDIO_VISUAL

    config = study.config.evaluate
    summary_path = study.path("eval", "summary.json")
    scored = False
    names = scored_names(study)
    if AUDIO_VISUAL not in names:
        print("evaluate: no audio-visual model (config.models.audio_visual.path unset): its audio, silent-video "
              "and sounded-video conditions are not scored")
    for model_key, record_names in names.items():
        todo = [(n, s) for n in record_names for s in config.splits if not study.records_path(n, s).exists()]
        if not todo:
            print(f"evaluate: {model_key} records exist for {list(config.splits)}, skipped")
            continue
        scored = True
        model = study.load_model(model_key)
        for name, split in todo:
            records = score_model(study, model, name, split, study.records_path(name, split),
                                  batch_size=study.scoring_batch_size(name, config.batch_size))
            print(f"evaluate: {name} model on {split}: {accuracy(records, study.classes_of(split))['overall']:.3f}",
                  flush=True)
        del model  # one model in memory at a time
    tables = summary(study, [n for record_names in names.values() for n in record_names], config.splits)
    if scored or not summary_path.exists():
        multihost.write_json(summary_path, tables, indent=1)
    split = study.config.switch.split
    if split in tables.get("audio", {}) and split in tables.get("visual", {}):
        gap = modality_gap(tables["audio"][split], tables["visual"][split])
        if multihost.is_main():
            print(f"modality gap on {split} (accuracy %):")
            print(markdown_table(gap, ["class", "audio", "visual", "difference"]))
