"""Evaluate: every clip of a split scored by letter logits, accuracy overall and per class, and the
modality-gap table (per class: audio model, visual model, difference).

Per-clip answers are saved as JSON lines (clip id, true class, the answer letter's index, the
ten letter logits, the predicted index), so later stages (switch labels, distillation
targets, the report) read them instead of scoring again.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from distill_jax.decoding import score_choices


def score_batches(model, batches: Iterable[dict], letter_token_ids: Sequence[int],
                  model_inputs: Callable[[dict], dict]) -> list[dict]:
    """One record per valid clip: {clip_id, label, answer, letter_logits, predicted}."""
    records = []
    for batch in batches:
        logits = np.asarray(score_choices(model, model_inputs(batch), letter_token_ids), np.float32)
        for row in np.flatnonzero(np.asarray(batch["valid"])):
            records.append({"clip_id": str(batch["clip_id"][row]), "label": int(batch["label"][row]),
                            "answer": int(batch["answer"][row]), "letter_logits": logits[row].tolist(),
                            "predicted": int(np.argmax(logits[row]))})
    return records


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


def write_records(path: str, records: Sequence[dict]) -> None:
    """JSON lines, written atomically (a finished file is complete)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table; floats as percentages with one decimal."""
    fmt = lambda v: f"{100 * v:.1f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def score_split(study, model, modality: str, split: str, out_path: str, *, batch_size: int,
                chunk_batches: int = 0) -> list[dict]:
    """Per-clip records of `model` on `split`, written to `out_path` (JSON lines).

    Resumable: every `chunk_batches` batches (0: one chunk) go to a part file under
    `out_path`.parts/ first; a rerun skips the batches of finished parts, and the finished
    split is one file (the parts are then removed).
    """
    import math
    import shutil

    import tqdm

    if os.path.exists(out_path):
        return read_records(out_path)
    total = math.ceil(study.num_examples(split) / batch_size)
    chunk_batches = chunk_batches or total
    parts_dir = f"{out_path}.parts-{chunk_batches}x{batch_size}"  # parts of another chunking are not reused
    os.makedirs(parts_dir, exist_ok=True)
    letters, inputs_of = study.letter_ids(modality), study.model_inputs(modality)
    part_path = lambda k: os.path.join(parts_dir, f"part-{k:05d}.jsonl")
    pending: list[dict] = []
    dataset = study.dataset(modality, split, batch_size=batch_size)
    for i, batch in enumerate(tqdm.tqdm(dataset, total=total, desc=f"{modality} on {split}", leave=False)):
        if os.path.exists(part_path(i // chunk_batches)):
            continue  # scored by an earlier run
        pending += score_batches(model, [batch], letters, inputs_of)
        if (i + 1) % chunk_batches == 0:
            write_records(part_path(i // chunk_batches), pending)
            pending = []
    if pending:  # the last, partial chunk (also when skipped records made the split shorter)
        write_records(part_path(i // chunk_batches), pending)
    records = [r for name in sorted(os.listdir(parts_dir)) for r in read_records(os.path.join(parts_dir, name))]
    write_records(out_path, records)
    shutil.rmtree(parts_dir)
    return records


def summary(study, names: Sequence[str], splits: Sequence[str]) -> dict:
    """{name: {split: accuracy dict}} for every records file that exists."""
    out = {}
    for name in names:
        for split in splits:
            path = study.records_path(name, split)
            if os.path.exists(path):
                out.setdefault(name, {})[split] = accuracy(read_records(path), study.classes)
    return out


def run(study) -> None:
    from distill_jax.stages.common import MODALITIES

    config = study.config.evaluate
    summary_path = study.path("eval", "summary.json")
    scored = False
    for modality in MODALITIES:
        todo = [s for s in config.splits if not os.path.exists(study.records_path(modality, s))]
        if not todo:
            print(f"evaluate: {modality} records exist for {list(config.splits)}, skipped")
            continue
        scored = True
        model = study.load_model(modality)
        for split in todo:
            records = score_split(study, model, modality, split, study.records_path(modality, split),
                                  batch_size=config.batch_size)
            print(f"evaluate: {modality} model on {split}: {accuracy(records, study.classes)['overall']:.3f}",
                  flush=True)
        del model  # one model in memory at a time
    tables = summary(study, MODALITIES, config.splits)
    if scored or not os.path.exists(summary_path):
        with open(summary_path, "w") as f:
            json.dump(tables, f, indent=1)
    split = study.config.switch.split
    if split in tables.get("audio", {}) and split in tables.get("visual", {}):
        gap = modality_gap(tables["audio"][split], tables["visual"][split])
        print(f"modality gap on {split} (accuracy %):")
        print(markdown_table(gap, ["class", "audio", "visual", "difference"]))
