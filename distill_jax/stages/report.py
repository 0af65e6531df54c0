"""Report: results.md, results.json and PNG plots in the workdir, from the other stages' records.

Accuracy of the student before and after distillation (per switch mode that was run) and of
the teacher, overall, per class and per class group, on every evaluated split; the switch's
accuracy; the modality gap per class. Class groups: "teacher-strong" / "student-strong"
classes are those where one model beats the other by at least `GAP` on the switch's split
(measured, as the paper does on its analysis set); the toy world also has its designed groups.
The checks the study is about are printed as measured statements, never asserted.
"""
from __future__ import annotations

import json
import os

import numpy as np

from distill_jax.stages.common import MODALITIES
from distill_jax.stages.evaluate import accuracy, markdown_table, modality_gap, read_records, summary

GAP = 0.10  # accuracy difference that makes a class teacher- or student-strong


def group_accuracy(records: list[dict], classes: list[str], members: set[str]) -> float | None:
    """Accuracy over the clips of classes in `members` (None if there are none)."""
    records = [r for r in records if classes[r["label"]] in members]
    return float(np.mean([r["predicted"] == r["answer"] for r in records])) if records else None


def strong_classes(study, tables: dict) -> dict[str, set[str]]:
    """Teacher-/student-strong classes from both models' `summary` tables on the switch's split."""
    split = study.config.switch.split
    groups = {"teacher-strong": set(), "student-strong": set(), "similar": set()}
    if split not in tables.get(study.teacher, {}) or split not in tables.get(study.student, {}):
        return groups  # the evaluate stage has not scored both models there yet
    teacher, student = tables[study.teacher][split]["per_class"], tables[study.student][split]["per_class"]
    for name in teacher:
        diff = teacher[name]["accuracy"] - student.get(name, {"accuracy": 0.0})["accuracy"]
        groups["teacher-strong" if diff >= GAP else "student-strong" if diff <= -GAP else "similar"].add(name)
    return groups


def designed_groups(study) -> dict[str, set[str]]:
    path = study.path("data", "design.json")
    if not study.config.toy or not os.path.exists(path):
        return {}
    with open(path) as f:
        design = json.load(f)
    groups: dict[str, set[str]] = {}
    for row in design["classes"]:
        groups.setdefault(f"designed: {row['group']}", set()).add(row["class"])
    return groups


def _fmt(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def build(study) -> dict:
    modes = list(study.config.distill.modes)
    splits = list(study.config.distill.eval_splits)
    names = {"student (original)": study.student, "teacher": study.teacher,
             **{f"student distilled ({m})": f"student_{m}" for m in modes}}
    gap_split = study.config.switch.split
    gap_tables = summary(study, MODALITIES, [gap_split])
    groups = {**strong_classes(study, gap_tables), **designed_groups(study)}
    results = {"direction": study.config.direction, "teacher": study.teacher, "student": study.student,
               "modes": modes, "splits": splits, "gap_threshold": GAP,
               "groups": {g: sorted(c) for g, c in groups.items()}, "accuracy": {}, "by_group": {}}
    for label, name in names.items():
        for split in splits:
            path = study.records_path(name, split)
            if not os.path.exists(path):
                continue
            records = read_records(path)
            results["accuracy"].setdefault(label, {})[split] = accuracy(records, study.classes)
            results["by_group"].setdefault(label, {})[split] = {
                g: group_accuracy(records, study.classes, members) for g, members in groups.items()}
    switch_metrics = study.path("switch", "metrics.json")
    if os.path.exists(switch_metrics):
        with open(switch_metrics) as f:
            results["switch"] = json.load(f)
    if all(gap_split in gap_tables.get(m, {}) for m in MODALITIES):
        results["modality_gap"] = {"split": gap_split, "rows": modality_gap(gap_tables["audio"][gap_split],
                                                                           gap_tables["visual"][gap_split])}
    results["checks"] = checks(results)
    timings = study.path("timings.json")
    if os.path.exists(timings):
        with open(timings) as f:
            results["timings_s"] = json.load(f)
    return results


def checks(results: dict) -> list[dict]:
    """The study's claims, each as measured on the first evaluated split (None: not run)."""
    if not results["splits"]:
        return []
    split = results["splits"][0]
    acc = lambda label: results["accuracy"].get(label, {}).get(split, {}).get("overall")
    grp = lambda label, g: results["by_group"].get(label, {}).get(split, {}).get(g)
    before, learned, always = "student (original)", "student distilled (learned)", "student distilled (always)"
    rows = []

    def add(claim, left, right, holds):
        rows.append({"claim": claim, "split": split, "measured": f"{_fmt(left)} vs {_fmt(right)}",
                     "holds": None if left is None or right is None else bool(holds(left, right))})

    add("distilled (learned) beats the original student overall", acc(learned), acc(before), lambda a, b: a > b)
    add("... on teacher-strong classes", grp(learned, "teacher-strong"), grp(before, "teacher-strong"),
        lambda a, b: a > b)
    add("... loses at most 2 points on student-strong classes", grp(learned, "student-strong"),
        grp(before, "student-strong"), lambda a, b: a >= b - 0.02)
    add("'always' does worse than 'learned' on student-strong classes", grp(always, "student-strong"),
        grp(learned, "student-strong"), lambda a, b: a < b)
    return rows


def markdown(results: dict) -> str:
    splits, lines = results["splits"], []
    lines += [f"# Results: {results['teacher']} teacher -> {results['student']} student "
              f"({results['direction']})", ""]
    lines += ["## Accuracy (%)", "", "| model | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for label, per_split in results["accuracy"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(per_split.get(s, {}).get("overall")) for s in splits) + " |")
    groups = list(results["groups"])
    for split in splits:
        lines += ["", f"## By class group, {split} (%)", "",
                  "| model | " + " | ".join(f"{g} ({len(results['groups'][g])})" for g in groups) + " |",
                  "|---|" + "---|" * len(groups)]
        for label, per_split in results["by_group"].items():
            if split in per_split:
                lines.append(f"| {label} | " + " | ".join(_fmt(per_split[split][g]) for g in groups) + " |")
    lines += ["", f"Teacher-/student-strong: the teacher's accuracy minus the student's on the "
              f"{results.get('modality_gap', {}).get('split', 'switch')} split is >= {100 * results['gap_threshold']:.0f} "
              "points / <= -that."]
    first = splits[0]
    labels = [label for label in results["accuracy"] if first in results["accuracy"][label]]
    if labels:
        names = sorted(results["accuracy"][labels[0]][first]["per_class"])
        lines += ["", f"## Per class, {first} (%)", "", "| class | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for name in names:
            cells = [results["accuracy"][label][first]["per_class"].get(name, {}).get("accuracy") for label in labels]
            lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    if "switch" in results:
        sw = results["switch"]
        lines += ["", "## Switch", ""]
        if "constant" in sw:
            lines.append(f"Not trained: every {sw['train_split']} label was {sw['constant']}; constant answer.")
        lines.append(f"On {sw['eval_split']}: accuracy {_fmt(sw['eval']['accuracy'])}, balanced accuracy "
                     f"{_fmt(sw['eval'].get('balanced_accuracy'))}" +
                     (f", always-majority baseline {_fmt(sw['majority_eval_accuracy'])}"
                      if "majority_eval_accuracy" in sw else ""))
    if "modality_gap" in results:
        lines += ["", f"## Modality gap, {results['modality_gap']['split']} (%)", "",
                  markdown_table(results["modality_gap"]["rows"], ["class", "audio", "visual", "difference"])]
    if results.get("timings_s"):
        lines += ["", "Stage wall times of the latest runs (s): " +
                  ", ".join(f"{k} {v:.0f}" for k, v in results["timings_s"].items())]
    lines += ["", "## The study's checks (measured)", "", "| claim | split | measured | holds |", "|---|---|---|---|"]
    for row in results["checks"]:
        holds = {True: "yes", False: "NO", None: "not run"}[row["holds"]]
        lines.append(f"| {row['claim']} | {row['split']} | {row['measured']} | {holds} |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    split = results["splits"][0]
    labels = [label for label in results["accuracy"] if split in results["accuracy"][label]]
    if labels:
        names = sorted(results["accuracy"][labels[0]][split]["per_class"])
        x, width = np.arange(len(names)), 0.8 / len(labels)
        fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(names)), 4.5))
        for i, label in enumerate(labels):
            per_class = results["accuracy"][label][split]["per_class"]
            ax.bar(x + i * width, [100 * per_class.get(n, {}).get("accuracy", 0.0) for n in names], width, label=label)
        ax.set_xticks(x + 0.4 - width / 2, names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"accuracy on {split} (%)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(os.path.join(out_dir, "per_class_accuracy.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    if "modality_gap" in results:
        rows = results["modality_gap"]["rows"]
        fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows)), 4.5))
        ax.bar([r["class"] for r in rows], [100 * r["difference"] for r in rows],
               color=["tab:orange" if r["difference"] > 0 else "tab:blue" for r in rows])
        ax.set_ylabel("visual - audio accuracy (points)")
        ax.set_title(f"modality gap on {results['modality_gap']['split']}")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        for tick in ax.get_xticklabels():
            tick.set_ha("right")
        fig.tight_layout()
        written.append(os.path.join(out_dir, "modality_gap.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def run(study) -> None:
    """Always rebuilt (cheap): the report reflects whatever the workdir holds now."""
    results = build(study)
    text = markdown(results)
    with open(study.path("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(study.path("results.md"), "w") as f:
        f.write(text)
    written = plots(results, study.workdir)
    print(text)
    print("report: " + ", ".join([study.path("results.md"), study.path("results.json"), *written]))
