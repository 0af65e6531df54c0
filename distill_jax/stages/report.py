"""Report: results.md, results.json and PNG plots in the workdir, from the other stages' records.

One report covers every seed of the run (`config.seeds`; each seed's outputs live in
`seed_<s>/`). It gives:
- **findings**: the study's claims (FINDINGS), each a paired comparison of two models on the
  same clips, pooled over the seeds: accuracy difference, paired bootstrap 95 % CI (stratified
  by seed), exact McNemar p-value, the per-seed differences, and whether it holds;
- accuracy of the student before and after distillation (per switch mode) and of the teacher,
  overall and per class group, mean +- sd over seeds, on every evaluated split;
- the switch's accuracy, balanced accuracy and always-majority baseline per seed;
- per class: (toy world) the world's design beside what each model measured; the modality gap.
Class groups: "teacher-strong" / "student-strong" classes are those where one model beats the
other by at least GAP on the switch's split (measured per seed, as the paper does on its
analysis set); the toy world also has its designed groups (`data_pipelines/toy_world.py`).
Each seed's own tables are in `seed_<s>/results.json`.
"""
from __future__ import annotations

import numpy as np

from distill_jax import multihost, stats
from distill_jax.stages.common import MODALITIES
from distill_jax.stages.evaluate import accuracy, markdown_table, modality_gap, read_records

GAP = 0.10  # accuracy difference that makes a class teacher- or student-strong
NON_INFERIORITY = 0.02  # "keeps" a group: the CI's lower bound of the difference is above -2 points
ORIGINAL, TEACHER = "student (original)", "teacher"


def distilled(mode: str) -> str:
    return f"student distilled ({mode})"


# name -> (split, class group or None for all classes, model a, model b, rule). rule "better":
# a - b > 0 with McNemar p < 0.05; "keeps": a - b >= -NON_INFERIORITY at the CI's lower bound.
# "visual"/"audio" name the modality's original model, whichever the direction.
FINDINGS = {
    "visual_beats_audio": ("test", None, "visual", "audio", "better"),
    "distilled_beats_original": ("test", None, distilled("learned"), ORIGINAL, "better"),
    "distilled_beats_original_teacher_strong": ("test", "teacher-strong", distilled("learned"), ORIGINAL, "better"),
    "distilled_beats_teacher": ("test", None, distilled("learned"), TEACHER, "better"),
    "distilled_keeps_student_strong": ("test", "student-strong", distilled("learned"), ORIGINAL, "keeps"),
    "learned_beats_always_student_strong": ("test", "student-strong", distilled("learned"), distilled("always"),
                                            "better"),
    "learned_beats_never": ("test", None, distilled("learned"), distilled("never"), "better"),
    "distilled_beats_original_unseen": ("unseen", None, distilled("learned"), ORIGINAL, "better"),
}


# ---------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------

AUDIO_VISUAL_LABELS = {"audio": "audio only", "video": "silent video", "audio_video": "sounded video"}


def audio_visual_reference(condition: str) -> str:
    return f"audio-visual reference ({AUDIO_VISUAL_LABELS[condition]})"


def model_names(study) -> dict[str, str]:
    """Report label -> records name (eval/<name>/<split>.jsonl) of every model of the study (the
    audio-visual reference once per condition, when the run has one)."""
    from distill_jax.stages.common import AUDIO_VISUAL, audio_visual_name
    from distill_jax.stages.label import distill_modes

    names = {ORIGINAL: study.student, TEACHER: study.teacher,
             **{distilled(m): f"student_{m}" for m in distill_modes(study)}}
    if study.audio_visual:
        names.update({audio_visual_reference(c): audio_visual_name(c)
                      for c in study.config.models[AUDIO_VISUAL].conditions})
    return names


def report_splits(study) -> list[str]:
    """Every split the report reads: the distilled students' first, then the switch's and evaluate's."""
    config = study.config
    return list(dict.fromkeys([*config.distill.eval_splits, *config.evaluate.splits, config.switch.split]))


def seed_records(study) -> dict[tuple[str, str], dict[str, dict]]:
    """(records name, split) -> {clip id: record} of every model of the study on every report split
    that was scored (read once; the tables and the findings share them)."""
    records = {}
    for name in set(model_names(study).values()):
        for split in report_splits(study):
            path = study.records_path(name, split)
            if path.exists():
                records[(name, split)] = {r["clip_id"]: r for r in read_records(path)}
    return records


def strong_classes(study, records: dict) -> dict[str, set[str]]:
    """Teacher-/student-strong classes from both models' records on the switch's split."""
    split = study.config.switch.split
    groups = {"teacher-strong": set(), "student-strong": set(), "similar": set()}
    teacher, student = records.get((study.teacher, split)), records.get((study.student, split))
    if teacher is None or student is None:
        return groups  # the evaluate stage has not scored both models there yet
    teacher = accuracy(list(teacher.values()), study.classes)["per_class"]
    student = accuracy(list(student.values()), study.classes)["per_class"]
    for name in teacher:
        diff = teacher[name]["accuracy"] - student.get(name, {"accuracy": 0.0})["accuracy"]
        groups["teacher-strong" if diff >= GAP else "student-strong" if diff <= -GAP else "similar"].add(name)
    return groups


def design(study) -> list[dict] | None:
    """The toy world's design table (design.json's rows), or None for real data."""
    path = study.path("data", "design.json")
    if not study.config.toy or not path.exists():
        return None
    return multihost.read_json(path)["classes"]


def group_accuracy(records: list[dict], classes: list[str], members: set[str]) -> float | None:
    """Accuracy over the clips of classes in `members` (None if there are none)."""
    records = [r for r in records if classes[r["label"]] in members]
    return float(np.mean([r["predicted"] == r["answer"] for r in records])) if records else None


def build_seed(study, records: dict) -> dict:
    """One seed's tables from its `seed_records`: accuracy per model and split (overall, per class,
    per group), groups, switch."""
    names = model_names(study)
    splits = report_splits(study)
    groups = strong_classes(study, records)
    rows = design(study)
    if rows is not None:
        for row in rows:
            groups.setdefault(f"designed: {row['designed_group']}", set()).add(row["class"])
    result = {"seed": int(study.config.seed), "groups": {g: sorted(c) for g, c in groups.items()},
              "accuracy": {}, "by_group": {}}
    for label, name in names.items():
        for split in splits:
            if (name, split) not in records:
                continue
            clips = list(records[(name, split)].values())
            result["accuracy"].setdefault(label, {})[split] = accuracy(clips, study.classes_of(split))
            result["by_group"].setdefault(label, {})[split] = {
                g: group_accuracy(clips, study.classes_of(split), members) for g, members in groups.items()}
    switch_metrics = study.path("switch", "metrics.json")
    if switch_metrics.exists():
        # Its evaluation; the training-loss curve stays in switch/metrics.json (a log, not a result:
        # it varies in the last digits with the number of hosts, as cross-host sums change order).
        result["switch"] = {k: v for k, v in multihost.read_json(switch_metrics).items() if k != "loss"}
    gap_split = study.config.switch.split
    if all((m, gap_split) in records for m in MODALITIES):
        result["modality_gap"] = {"split": gap_split, "rows": modality_gap(
            *(accuracy(list(records[(m, gap_split)].values()), study.classes) for m in MODALITIES))}
    return result


# ---------------------------------------------------------------------------------------------
# Findings, pooled over seeds
# ---------------------------------------------------------------------------------------------

def _correct(records: dict[str, dict], clip_ids: list[str]) -> np.ndarray:
    return np.asarray([records[c]["predicted"] == records[c]["answer"] for c in clip_ids])


def finding(name: str, studies: list, seed_results: list[dict], records: list[dict]) -> dict:
    """One finding over every seed (pooled clips), with its per-seed differences; `records`: each
    seed's `seed_records`."""
    return paired_comparison(name, *FINDINGS[name], studies, seed_results, records)


def paired_comparison(name: str, split: str, group: str | None, a_label: str, b_label: str, rule: str,
                      studies: list, seed_results: list[dict], records: list[dict]) -> dict:
    """Models `a_label` and `b_label` on the same clips of `split` (of `group`'s classes), pooled over
    the seeds: accuracies, difference with its paired bootstrap CI, McNemar p, and whether `rule` holds."""
    out = {"name": name, "split": split, "classes": group or "all", "a_model": a_label, "b_model": b_label,
           "rule": rule, "a": None, "b": None, "diff": None, "ci95": None, "p_value": None, "holds": None,
           "seeds": []}
    pooled_a, pooled_b, strata = [], [], []
    for study, result, scored in zip(studies, seed_results, records):
        names = {**model_names(study), "visual": "visual", "audio": "audio"}
        if a_label not in names or b_label not in names:
            return {**out, "note": "not run"}
        a, b = scored.get((names[a_label], split)), scored.get((names[b_label], split))
        if a is None or b is None:
            return {**out, "note": "not run"}
        clip_ids = sorted(set(a) & set(b))
        if group is not None:
            members = set(result["groups"].get(group, ()))
            clip_ids = [c for c in clip_ids if study.classes_of(split)[a[c]["label"]] in members]
        if not clip_ids:
            out["seeds"].append({"seed": result["seed"], "diff": None, "clips": 0})
            continue
        ca, cb = _correct(a, clip_ids), _correct(b, clip_ids)
        out["seeds"].append({"seed": result["seed"], "diff": float(ca.mean() - cb.mean()), "clips": len(clip_ids),
                             "p_value": stats.mcnemar_p(ca, cb)})
        pooled_a.append(ca), pooled_b.append(cb), strata.append(np.full(len(ca), result["seed"]))
    if not pooled_a:
        return {**out, "note": f"no clips of {group} classes"}
    comparison = stats.compare(np.concatenate(pooled_a), np.concatenate(pooled_b), strata=np.concatenate(strata))
    out.update(comparison)
    if rule == "better":
        out["holds"] = bool(comparison["diff"] > 0 and comparison["p_value"] < 0.05)
    else:
        out["holds"] = bool(comparison["ci95"][0] >= -NON_INFERIORITY)
    return out


def findings(studies: list, seed_results: list[dict], records: list[dict]) -> list[dict]:
    return [finding(name, studies, seed_results, records) for name in FINDINGS]


def switch_variants(studies: list, seed_results: list[dict], records: list[dict]) -> dict | None:
    """Per switch (config.switch.inputs, then each variant): its accuracy on its evaluation split
    beside the always-majority baseline (mean +- sd over seeds), and its distilled student on the
    findings' split against the original student and against the main switch's student (paired,
    pooled over seeds, with bootstrap CIs)."""
    from distill_jax.stages.switch import switch_dir, switch_inputs, variant_mode

    first = studies[0]
    if "learned" not in first.config.distill.modes:
        return None
    split = FINDINGS["distilled_beats_original"][0]
    main = distilled("learned")  # the config.switch.inputs switch's student
    out = {}
    for inputs in switch_inputs(first):
        metrics = [switch_dir(study, inputs) / "metrics.json" for study in studies]
        metrics = [multihost.read_json(m) if m.exists() else None for m in metrics]
        student = distilled(variant_mode(first, inputs))
        row = {"mode": variant_mode(first, inputs), "eval_split": first.config.switch.eval_split,
               "constant_in_seeds": [r["seed"] for r, m in zip(seed_results, metrics) if m and "constant" in m]}
        for key in ("accuracy", "balanced_accuracy", "majority_baseline"):
            row[key] = _spread([m and m["eval"][key] for m in metrics])
        row["distilled_vs_original"] = paired_comparison(f"{inputs}: distilled vs original", split, None, student,
                                                         ORIGINAL, "better", studies, seed_results, records)
        if student != main:
            row["distilled_vs_main_switch"] = paired_comparison(f"{inputs} vs {first.config.switch.inputs} switch",
                                                                split, None, student, main, "better", studies,
                                                                seed_results, records)
        out[inputs] = row
    return out


# ---------------------------------------------------------------------------------------------
# Over seeds
# ---------------------------------------------------------------------------------------------

def _spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean, sd = stats.mean_sd(values)
    return {"mean": mean, "sd": sd, "per_seed": values}


def aggregate(studies: list, seed_results: list[dict]) -> dict:
    """Mean +- sd over seeds of every accuracy, group accuracy, per-class accuracy and switch figure."""
    first = studies[0]
    labels = list(model_names(first))
    splits = list(dict.fromkeys(s for r in seed_results for per in r["accuracy"].values() for s in per))
    groups = list(dict.fromkeys(g for r in seed_results for g in r["groups"]))
    acc, by_group, per_class = {}, {}, {}
    for label in labels:
        for split in splits:
            cells = [r["accuracy"].get(label, {}).get(split) for r in seed_results]
            if all(c is None for c in cells):
                continue
            acc.setdefault(label, {})[split] = _spread([c and c["overall"] for c in cells])
            by_group.setdefault(label, {})[split] = {
                g: _spread([r["by_group"].get(label, {}).get(split, {}).get(g) for r in seed_results]) for g in groups}
            per_class.setdefault(label, {})[split] = {
                name: _spread([c and c["per_class"].get(name, {}).get("accuracy") for c in cells])
                for name in first.classes_of(split)}
    switch = None
    if any("switch" in r for r in seed_results):
        switch = {key: _spread([r.get("switch", {}).get("eval", {}).get(key) for r in seed_results])
                  for key in ("accuracy", "balanced_accuracy", "majority_baseline")}
    gap = None
    if all("modality_gap" in r for r in seed_results):
        rows = {}
        for r in seed_results:
            for row in r["modality_gap"]["rows"]:
                rows.setdefault(row["class"], []).append(row)
        gap = {"split": seed_results[0]["modality_gap"]["split"], "rows": sorted(
            ({"class": name, **{k: float(np.mean([x[k] for x in xs])) for k in ("audio", "visual", "difference")}}
             for name, xs in rows.items()), key=lambda row: (-row["difference"], row["class"]))}
    return {"accuracy": acc, "by_group": by_group, "per_class": per_class, "switch": switch, "modality_gap": gap,
            "groups": groups}


def build(studies: list) -> dict:
    from distill_jax.stages.label import distill_modes

    records = [seed_records(study) for study in studies]
    seed_results = [build_seed(study, scored) for study, scored in zip(studies, records)]
    first = studies[0]
    splits = list(dict.fromkeys([*first.config.distill.eval_splits, *first.config.evaluate.splits]))
    results = {"direction": first.config.direction, "teacher": first.teacher, "student": first.student,
               "seeds": [r["seed"] for r in seed_results], "modes": distill_modes(first),
               "splits": splits, "gap_threshold": GAP, "non_inferiority_margin": NON_INFERIORITY,
               "clips": {split: first.num_examples(split) for split in splits},
               "findings": findings(studies, seed_results, records), **aggregate(studies, seed_results),
               "design": design(first), "per_seed": seed_results}
    from distill_jax.stages import analysis

    results["analysis"] = analysis.build(studies, records)
    if results["analysis"] is not None:  # the unseen classes: the original and distilled students there
        unseen = {label: per["unseen"] for label, per in results["accuracy"].items()
                  if "unseen" in per and (label == ORIGINAL or label.startswith("student distilled"))}
        results["analysis"]["unseen"] = unseen or None
        results["analysis"]["switch_variants"] = switch_variants(studies, seed_results, records)
    from distill_jax import data_errors

    results["data_errors"] = {"on_error": first.config.data.on_error,
                              "max_error_fraction": first.config.data.max_error_fraction,
                              "skipped": data_errors.summary(data_errors.read_all(first.run_dir))}
    for row in results["data_errors"]["skipped"]:
        row["of"] = first.num_examples(row["split"])
    results["data_errors"]["converter_skipped"] = converter_skipped(first)
    from distill_jax import input_stats

    results["inputs"] = {str(r["seed"]): input_stats.summary(multihost.read_json(s.path("input_shapes.json")))
                         for s, r in zip(studies, seed_results) if s.path("input_shapes.json").exists()}
    timings = [study.path("timings.json") for study in studies]
    results["timings_s"] = {}
    for path, result in zip(timings, seed_results):
        if path.exists():
            results["timings_s"][str(result["seed"])] = multihost.read_json(path)
    return results


# ---------------------------------------------------------------------------------------------
# Markdown and plots
# ---------------------------------------------------------------------------------------------

def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _mean_sd(cell) -> str:
    if cell is None:
        return "-"
    return f"{100 * cell['mean']:.1f}" + (f" ± {100 * cell['sd']:.1f}" if len(cell["per_seed"]) > 1 else "")


def _signed(value) -> str:
    return f"{100 * value:+.1f}"


def findings_table(results: dict) -> str:
    lines = ["| finding | split (classes) | a vs b | a | b | a − b [95% CI] | McNemar p | holds | per seed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in results["findings"]:
        where = f"{f['split']} ({f['classes']})"
        if f["diff"] is None:
            lines.append(f"| {f['name']} | {where} | {f['a_model']} vs {f['b_model']} | - | - | - | - | "
                         f"{f.get('note', 'not run')} | - |")
            continue
        holds = "yes" if f["holds"] else "NO"
        per_seed = ", ".join("-" if s["diff"] is None else _signed(s["diff"]) for s in f["seeds"])
        lines.append(f"| {f['name']} | {where} | {f['a_model']} vs {f['b_model']} | {_pct(f['a'])} | {_pct(f['b'])} | "
                     f"{_signed(f['diff'])} [{_signed(f['ci95'][0])}, {_signed(f['ci95'][1])}] | "
                     f"{f['p_value']:.2g} | {holds} | {per_seed} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    seeds, splits = results["seeds"], results["splits"]
    clips = ", ".join(f"{s} {n}" for s, n in results["clips"].items())
    lines = [f"# Results: {results['teacher']} teacher -> {results['student']} student ({results['direction']})", "",
             f"Seeds {', '.join(map(str, seeds))} ({len(seeds)} run{'s' if len(seeds) > 1 else ''} of the whole study: "
             f"world, warm start, switch, distillation); clips per seed: {clips}.", "",
             f"## Findings (pooled over {len(seeds)} seed{'s' if len(seeds) > 1 else ''})", "",
             findings_table(results), "",
             "a, b: accuracy (%) of the two models on the same clips; a − b with its paired bootstrap 95 % CI "
             "(clips resampled within each seed) and the exact McNemar p-value. A \"better\" finding holds when "
             f"a − b > 0 with p < 0.05; distilled_keeps_student_strong holds when the CI's lower bound is above "
             f"−{100 * results['non_inferiority_margin']:.0f} points. Per seed: a − b of each seed.", ""]
    if any(f["diff"] is not None for f in results["findings"]):
        lines += ["![each finding's a − b with its 95 % CI](findings.png)", ""]
    lines += ["## Accuracy (%)" + (", mean ± sd over seeds" if len(seeds) > 1 else ""), "",
              "| model | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for label, per_split in results["accuracy"].items():
        lines.append(f"| {label} | " + " | ".join(_mean_sd(per_split.get(s)) for s in splits) + " |")
    groups = results["groups"]
    sizes = {g: sorted({len(r["groups"].get(g, ())) for r in results["per_seed"]}) for g in groups}
    for split in splits:
        lines += ["", f"## By class group, {split} (%)", "",
                  "| model | " + " | ".join(f"{g} ({'/'.join(map(str, sizes[g]))})" for g in groups) + " |",
                  "|---|" + "---|" * len(groups)]
        for label, per_split in results["by_group"].items():
            if split in per_split:
                lines.append(f"| {label} | " + " | ".join(_mean_sd(per_split[split][g]) for g in groups) + " |")
    lines += ["", f"Teacher-/student-strong (per seed, class counts in brackets): the teacher's accuracy minus the "
              f"student's on the switch's split is >= {100 * results['gap_threshold']:.0f} points / <= -that."]
    lines += per_class_section(results)
    lines += analysis_section(results.get("analysis"))
    sw = results.get("switch")
    if sw:
        lines += ["", "## Switch", "", "| seed | labels | train clips (teacher better) | eval split | accuracy | "
                  "balanced accuracy | always-majority | beats majority |", "|---|---|---|---|---|---|---|---|"]
        for r in results["per_seed"]:
            s = r.get("switch")
            if not s:
                continue
            ev = s["eval"]
            train = s.get("train", {})
            lines.append(f"| {r['seed']} | {s.get('label_mode', '-')} | {train.get('clips', '-')} "
                         f"({train.get('positives', '-')}) | {s['eval_split']} | {_pct(ev['accuracy'])} | "
                         f"{_pct(ev['balanced_accuracy'])} | {_pct(ev['majority_baseline'])} | "
                         f"{'yes' if ev['accuracy'] > ev['majority_baseline'] else 'NO'} |"
                         + (" constant: every label the same |" if "constant" in s else ""))
        if len(seeds) > 1:
            lines.append(f"| mean ± sd | | | | {_mean_sd(sw['accuracy'])} | {_mean_sd(sw['balanced_accuracy'])} | "
                         f"{_mean_sd(sw['majority_baseline'])} | |")
    lines += switch_variants_section((results.get("analysis") or {}).get("switch_variants"))
    if results.get("modality_gap"):
        lines += ["", f"## Modality gap, {results['modality_gap']['split']} (%)" +
                  (", mean over seeds" if len(seeds) > 1 else ""), "",
                  markdown_table(results["modality_gap"]["rows"], ["class", "audio", "visual", "difference"]),
                  "", "![visual − audio accuracy per class](modality_gap.png)"]
    lines += data_errors_section(results)
    lines += inputs_section(results.get("inputs"))
    if results.get("timings_s"):
        lines += ["", "Stage wall times (s): " + "; ".join(
            f"seed {seed}: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) for seed, t in results["timings_s"].items())]
    return "\n".join(lines) + "\n"


def switch_variants_section(variants: dict | None) -> list[str]:
    """What the switch sees (audio, + the visual embedding, + both models' confidence): each switch
    against its always-majority baseline, and its distilled student, paired on the same clips."""
    if not variants or len(variants) < 2:
        return []
    fmt = lambda c: ("-" if not c or c.get("diff") is None else  # noqa: E731
                     f"{_signed(c['diff'])} [{_signed(c['ci95'][0])}, {_signed(c['ci95'][1])}], p {c['p_value']:.2g}")
    first = next(iter(variants.values()))
    split = first["distilled_vs_original"]["split"]
    lines = ["", f"## Switch variants (what the switch sees); switch on {first['eval_split']}, students on {split}", "",
             "| switch inputs | switch accuracy | always-majority | distilled student | vs original student: "
             "diff [95 % CI], McNemar p | vs the main switch's student |", "|---|---|---|---|---|---|"]
    for inputs, row in variants.items():
        vs = row["distilled_vs_original"]
        main = fmt(row["distilled_vs_main_switch"]) if "distilled_vs_main_switch" in row else "(main)"
        lines.append(f"| {inputs} | {_mean_sd(row['accuracy'])} | {_mean_sd(row['majority_baseline'])} | "
                     f"{_pct(vs['a'])} | {fmt(vs)} | {main} |")
    return lines + ["", "Accuracies in %, the students' pooled over seeds; a difference whose CI spans 0 is not a "
                        "finding."]


def converter_skipped(study) -> list[dict]:
    """The clips the converter left out of the run's manifests (unreadable files, no audio stream,
    too short, ...): clip id, split, reason and detail, as its manifest lists them."""
    from distill_jax.stages.common import UNSEEN

    rows = [{**row, "manifest": "main"} for row in study.manifest.get("skipped", [])]
    if study.unseen_manifest_path() is not None and UNSEEN in study.config.evaluate.splits:
        rows += [{**row, "manifest": UNSEEN} for row in study.unseen_manifest.get("skipped", [])]
    return rows


MAX_LISTED = 50


def converter_section(rows: list[dict]) -> list[str]:
    if not rows:
        return ["", "The converter skipped no clip."]
    lines = ["", f"The converter skipped {len(rows)} clip(s), left out of every split (the manifests' `skipped`):", "",
             "| manifest | split | clip | reason | detail |", "|---|---|---|---|---|"]
    for row in rows[:MAX_LISTED]:
        detail = str(row.get("detail", "")).replace("|", "/")[:120]
        lines.append(f"| {row['manifest']} | {row['split']} | {row['clip_id']} | {row['reason']} | {detail} |")
    if len(rows) > MAX_LISTED:
        lines.append(f"| ... | | {len(rows) - MAX_LISTED} more | | |")
    return lines


def inputs_section(inputs: dict | None) -> list[str]:
    """Per seed and program: the distinct input shapes (one compile each) against the bound, and padding."""
    if not inputs:
        return []
    lines = ["", "## Compiled input shapes", "",
             "| seed | model / program | input shapes (compiles) | at most | batch sizes |", "|---|---|---|---|---|"]
    for seed, summary in inputs.items():
        for key, p in summary["programs"].items():
            lines.append(f"| {seed} | {key} | {p['shapes']} | {'-' if p['bound'] is None else p['bound']} | "
                         f"{', '.join(map(str, p['batch_sizes']))} |")
    lines += ["", "| seed | model / program / split | padding of prompt tokens (%) | of video patches (%) |",
              "|---|---|---|---|"]
    for seed, summary in inputs.items():
        for key, p in summary["padding"].items():
            lines.append(f"| {seed} | {key} | {_pct(p.get('tokens'))} | {_pct(p.get('patches'))} |")
    return lines + ["", "At most: the padding's bucket count (video: frame x patch bucket pairs; audio: prompt buckets) "
                        "per batch size; padding: process 0's batches."]


def data_errors_section(results: dict) -> list[str]:
    errors = results.get("data_errors")
    if not errors:
        return []
    lines = ["", "## Data errors", "", *converter_section(errors.get("converter_skipped", [])), ""]
    if not errors["skipped"]:
        return lines + [f"No record was skipped while reading (on_error={errors['on_error']!r})."]
    lines += ["| seed | split | skipped records | of records | reasons (records) |", "|---|---|---|---|---|"]
    for row in errors["skipped"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in row["reasons"].items())
        lines.append(f"| {row['seed']} | {row['split']} | {row['skipped']} | {row['of']} | {reasons} |")
    return lines + ["", f"Each skipped record is listed with its file, offset, clip id and reason in data_errors.jsonl "
                        f"(the run stops past {100 * errors['max_error_fraction']:g} % of a split)."]


def analysis_section(a: dict | None) -> list[str]:
    """Models beside humans (the paper's analysis): accuracy per condition, gap correlation, kappa."""
    if not a or not a["human_accuracy"]:
        return []
    who = "simulated participants (the toy world's design, not people)" if a["humans"]["simulated"] else "people"
    lines = ["", f"## Models and humans, {a['split']} ({who})", "",
             "| condition | humans | participants | model | model accuracy | kappa (model vs human majority) |",
             "|---|---|---|---|---|---|"]
    for condition, h in a["human_accuracy"].items():
        m, k = a["model_accuracy"].get(condition), a["kappa"].get(condition)
        kappa = "-" if not k or k["value"] is None else f"{k['value']:.2f} ({k['clips']} clips)"
        lines.append(f"| {condition} | {_pct(h['overall'])} | {h['participants']} | "
                     f"{m['model'] if m else '(none)'} | {_pct(m['overall']) if m else '-'} | {kappa} |")
    c = a.get("gap_correlation")
    if c and c["pearson"]["value"] is not None:
        fmt = lambda r: f"{r['value']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"  # noqa: E731
        lines += ["", f"Sensory gap (video − audio accuracy) per class, models vs humans over {c['classes']} classes: "
                  f"Pearson {fmt(c['pearson'])}, Spearman {fmt(c['spearman'])} (bootstrap 95 % CIs over classes). "
                  f"Most visual for the models: {'; '.join(a['strongest']['models']['visual'])}; for humans: "
                  f"{'; '.join(a['strongest']['humans']['visual'])}. Most auditory for the models: "
                  f"{'; '.join(a['strongest']['models']['audio'])}; for humans: "
                  f"{'; '.join(a['strongest']['humans']['audio'])}."]
    if a.get("gaps"):
        lines += ["", "![sensory gap per class, models vs humans](gap_models_vs_humans.png)", "",
                  "![per-class gaps sorted by the humans' gap](gap_by_class.png)"]
    for side in ("models", "humans"):
        pairs = [f"{cond}: " + ", ".join(f"{p['true']} → {p['chosen']} ({p['count']})" for p in rows[:3])
                 for cond, rows in a["confusions"][side].items() if rows]
        if pairs:
            lines += ["", f"Most confused by the {side} (true → answered, clips): " + "; ".join(pairs) + "."]
    if a.get("unseen"):
        lines += ["", "Unseen classes (never in distillation): " + ", ".join(
            f"{label} {_mean_sd(cell)}" for label, cell in a["unseen"].items()) + " (%)."]
    if a["humans"]["unknown_clip_rows"]:
        lines += ["", f"{a['humans']['unknown_clip_rows']} response rows name clips this run does not have; "
                  "they are left out."]
    return lines


def per_class_section(results: dict) -> list[str]:
    """Per class on the first split: (toy) the designed group and bounds, then every model's accuracy."""
    split = results["splits"][0] if results["splits"] else None
    labels = [label for label in results["per_class"] if split in results["per_class"][label]]
    if not labels:
        return []
    rows = {r["class"]: r for r in results["design"] or []}
    names = list(rows) if rows else sorted(results["per_class"][labels[0]][split])
    names = [n for n in names if any(results["per_class"][label][split].get(n) for label in labels)]
    design_cols = ["designed group", "audio Bayes bound", "visual Bayes bound"] if rows else []
    lines = ["", f"## Per class, {split} (%)" + (", mean over seeds" if len(results["seeds"]) > 1 else ""), ""]
    if rows:
        lines += ["The toy world's design (`data_pipelines/toy_world.py`, `design.json`) beside what was measured. "
                  "Bayes bound: the best accuracy a classifier of that modality can reach on the class's hard pair "
                  "(100 where the class has none); \"unlearned\": the audio model's pretraining labels were "
                  "scrambled within a group of clearly different sounds, so its own input holds what it lacks.", ""]
    lines += ["| class | " + " | ".join(design_cols + labels) + " |", "|---|" + "---|" * (len(design_cols) + len(labels))]
    for name in names:
        cells = []
        if rows:
            row = rows[name]
            scrambled = row.get("audio_pretrain_scrambled_with") or []
            group = row["designed_group"] + (f" (with {', '.join(scrambled)})" if scrambled else "")
            cells += [group, _pct(row["audio_pair_bayes_accuracy"]), _pct(row["visual_pair_bayes_accuracy"])]
        for label in labels:
            cell = results["per_class"][label][split].get(name)
            cells.append(_pct(cell and cell["mean"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + ["", f"![accuracy per class on {split}](per_class_accuracy.png)"]


def _save(fig, out_dir, name: str) -> str:
    """The figure as PNG bytes, written by process 0 into `out_dir` (local or gs://)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    target = multihost.path(out_dir) / name
    multihost.write_bytes(target, buffer.getvalue())
    return str(target)


def plots(results: dict, out_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    split = results["splits"][0] if results["splits"] else None
    labels = [label for label in results["per_class"] if split in results["per_class"][label]]
    if labels:
        names = sorted(n for n, c in results["per_class"][labels[0]][split].items() if c)
        x, width = np.arange(len(names)), 0.8 / len(labels)
        fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(names)), 4.5))
        for i, label in enumerate(labels):
            cells = [results["per_class"][label][split].get(n) for n in names]
            ax.bar(x + i * width, [100 * c["mean"] if c else 0.0 for c in cells], width, label=label,
                   yerr=[100 * c["sd"] if c else 0.0 for c in cells] if len(results["seeds"]) > 1 else None)
        ax.set_xticks(x + 0.4 - width / 2, names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"accuracy on {split} (%)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(_save(fig, out_dir, "per_class_accuracy.png"))
        plt.close(fig)
    if results.get("modality_gap"):
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
        written.append(_save(fig, out_dir, "modality_gap.png"))
        plt.close(fig)
    gaps = (results.get("analysis") or {}).get("gaps")
    if gaps:
        corr = results["analysis"]["gap_correlation"]
        fig, ax = plt.subplots(figsize=(6, 6))
        x, y = [100 * g["model_gap"] for g in gaps], [100 * g["human_gap"] for g in gaps]
        ax.scatter(x, y)
        for g, xi, yi in zip(gaps, x, y):
            ax.annotate(g["class"], (xi, yi), fontsize=7)
        ax.axhline(0, color="grey", lw=0.8), ax.axvline(0, color="grey", lw=0.8)
        who = "simulated humans" if results["analysis"]["humans"]["simulated"] else "humans"
        ax.set_xlabel("models: visual - audio accuracy (points)")
        ax.set_ylabel(f"{who}: video - audio accuracy (points)")
        r = corr["pearson"]["value"] if corr else None
        ax.set_title("sensory gap per class" + (f": Pearson r = {r:.2f}" if r is not None else ""))
        fig.tight_layout()
        written.append(_save(fig, out_dir, "gap_models_vs_humans.png"))
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(gaps)), 4.5))  # sorted by the humans' gap
        pos = np.arange(len(gaps))
        ax.bar(pos - 0.2, x, 0.4, label="models (visual - audio)")
        ax.bar(pos + 0.2, y, 0.4, label=f"{who} (video - audio)")
        ax.set_xticks(pos, [g["class"] for g in gaps], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("accuracy gap (points)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir, "gap_by_class.png"))
        plt.close(fig)
    measured = [f for f in results["findings"] if f["diff"] is not None]
    if measured:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(measured) + 1.2))
        y = np.arange(len(measured))[::-1]
        diffs = np.array([100 * f["diff"] for f in measured])
        lo = diffs - np.array([100 * f["ci95"][0] for f in measured])
        hi = np.array([100 * f["ci95"][1] for f in measured]) - diffs
        for i, f in enumerate(measured):
            ax.errorbar(diffs[i], y[i], xerr=[[lo[i]], [hi[i]]], fmt="o", capsize=3,
                        color="tab:green" if f["holds"] else "tab:red")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, [f"{f['name']} ({f['split']})" for f in measured], fontsize=8)
        ax.set_xlabel("a − b, accuracy points (95 % CI)")
        fig.tight_layout()
        written.append(_save(fig, out_dir, "findings.png"))
        plt.close(fig)
    return written


def run(studies: list, workdir) -> dict:
    """Always rebuilt (cheap): the report reflects whatever the workdir holds now. Process 0
    writes it (the other hosts compute the same tables and print nothing)."""
    results = build(studies)
    if not multihost.is_main():
        return results
    workdir = multihost.path(workdir)
    for seed_result, study in zip(results["per_seed"], studies):
        multihost.write_json(study.path("results.json"), seed_result, indent=1)
    text = markdown(results)
    multihost.write_json(workdir / "results.json", results, indent=1)
    multihost.write_text(workdir / "results.md", text)
    written = plots(results, workdir)
    print(text)
    print("report: " + ", ".join([str(workdir / "results.md"), str(workdir / "results.json"), *written]))
    return results
