"""Models and humans on the same questions (the paper's analysis), part of the report.

On the analysis split (config.switch.split), per class: the audio model on the sound, the
visual model on the silent video, the audio-visual model (if the run has one) on the sounded
video, and people in the same three conditions (`data_pipelines.humans`: config.data.humans,
or in the toy world simulated participants, `data/humans_simulated.csv`, labelled simulated).
It gives each side's per-class accuracy and sensory gap (video - audio), how well the models'
gaps follow the humans' (Pearson and Spearman over classes, with bootstrap 95 % CIs that
resample classes), agreement per condition (Cohen's kappa between the model's answer and the
human majority's, per clip), the classes each side finds most visual or most auditory, and the
most confused class pairs. Seeds are pooled (each toy seed is its own world and people).
"""
from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

from data_pipelines import humans as humans_lib
from distill_jax import multihost

# condition -> the records name of the model shown the clip that way (the audio-visual one if any)
MODEL_OF_CONDITION = {"audio": "audio", "video": "visual", "audio_video": "audio_visual_audio_video"}
BOOTSTRAP = 2000
TOP = 5


def responses_path(study):
    """The run's human responses: config.data.humans, or (toy world) the simulated file; None: none."""
    path = study.config.data.get("humans")
    if path:
        return multihost.path(path)
    return study.path("data", "humans_simulated.csv") if study.config.toy else None


def simulated(study) -> bool:
    return not study.config.data.get("humans") and bool(study.config.toy)


def ensure_simulated(study, split_records: dict[str, dict]) -> None:
    """Toy world: write the simulated responses on the split's clips once (their own questions)."""
    path = responses_path(study)
    if not simulated(study) or path.exists() or not multihost.is_main():
        return
    design = multihost.read_json(study.path("data", "design.json"))["classes"]
    maker = study.question_maker()
    clips = []
    for clip_id, record in sorted(split_records.items()):
        name = study.classes[record["label"]]
        clips.append((clip_id, name, maker(clip_id, name).options))
    multihost.write_text(path, humans_lib.simulate(clips, design, seed=int(study.config.seed)))  # atomic


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items (None when chance agreement is 1)."""
    a, b = np.asarray(a), np.asarray(b)
    labels = np.unique(np.concatenate([a, b]))
    observed = float(np.mean(a == b))
    chance = float(sum(np.mean(a == k) * np.mean(b == k) for k in labels))
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of each row pair of x and y [draws, n] (NaN where a row is constant)."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(x * y, axis=1) / np.sqrt(np.sum(x * x, axis=1) * np.sum(y * y, axis=1))


def correlation(x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> dict:
    """Pearson and Spearman of x and y (scipy's), with percentile bootstrap 95 % CIs: pairs resampled,
    all draws at once (a draw whose resample is constant on a side is left out)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": {"value": None, "ci95": None}, "spearman": {"value": None, "ci95": None},
                "classes": int(len(x))}
    index = np.random.default_rng(seed).integers(0, len(x), (BOOTSTRAP, len(x)))
    xs, ys = x[index], y[index]
    draws = {"pearson": _pearson_rows(xs, ys),
             "spearman": _pearson_rows(scipy_stats.rankdata(xs, axis=1), scipy_stats.rankdata(ys, axis=1))}
    values = {"pearson": scipy_stats.pearsonr(x, y)[0], "spearman": scipy_stats.spearmanr(x, y)[0]}
    out = {}
    for name, value in values.items():
        finite = draws[name][np.isfinite(draws[name])]
        out[name] = {"value": float(value), "ci95": [float(np.percentile(finite, 2.5)),
                                                     float(np.percentile(finite, 97.5))]}
    return {**out, "classes": int(len(x))}


def _confusions(pairs: list[tuple[str, str]]) -> list[dict]:
    counts: dict[tuple[str, str], int] = {}
    for truth, chosen in pairs:
        if truth != chosen:
            counts[(truth, chosen)] = counts.get((truth, chosen), 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]
    return [{"true": t, "chosen": c, "count": n} for (t, c), n in ranked]


def build(studies: list, records: list[dict]) -> dict | None:
    """results.json's `analysis` ({} parts where a side is missing); None without the split's records.

    `records`: each seed's report records ((name, split) -> {clip id: record}); the models the
    report does not list (with the audio-visual teacher, the visual model) are read here.
    """
    from distill_jax.stages.evaluate import accuracy, read_records

    first = studies[0]
    split = first.config.switch.split
    models, scored_by_condition, human_rows, unknown, sources = {}, {}, [], 0, []
    for study, seed_records in zip(studies, records):
        scored = {}
        for name in MODEL_OF_CONDITION.values():
            path = study.records_path(name, split)
            if (name, split) in seed_records:
                scored[name] = seed_records[(name, split)]
            elif path.exists():
                scored[name] = {r["clip_id"]: r for r in read_records(path)}
        if "audio" not in scored:
            return None  # the evaluate stage has not run
        ensure_simulated(study, scored["audio"])
        truth = {c: study.classes[r["label"]] for c, r in scored["audio"].items()}
        path = responses_path(study)
        if path is not None and path.exists():
            responses = humans_lib.read_responses(multihost.local_file(path), truth, study.classes)
            human_rows += [dict(r, clip_id=f"{study.config.seed}/{r['clip_id']}") for r in responses.rows]
            unknown += responses.num_unknown
            # as the config names it, or the simulated file relative to the run (results.json is the same anywhere)
            sources.append(study.config.data.get("humans") or str(path.relative_to(study.run_dir)))
        maker = study.question_maker()
        for condition, name in MODEL_OF_CONDITION.items():
            for clip_id, r in (scored.get(name) or {}).items():
                truth = study.classes[r["label"]]  # the model's letter, as a class of the clip's own options
                scored_by_condition.setdefault(condition, []).append(r)
                models.setdefault(condition, []).append(
                    {"clip_id": f"{study.config.seed}/{clip_id}", "truth": truth,
                     "chosen": maker(clip_id, truth).options[r["predicted"]]})
    pooled = humans_lib.HumanResponses(";".join(sources), human_rows, {})
    human_accuracy = humans_lib.accuracy_by_condition(pooled)
    model_accuracy = {condition: {"model": MODEL_OF_CONDITION[condition], **accuracy(clips, first.classes)}
                      for condition, clips in scored_by_condition.items()}
    gaps = []
    for name in first.classes:
        try:
            model_gap = (model_accuracy["video"]["per_class"][name]["accuracy"]
                         - model_accuracy["audio"]["per_class"][name]["accuracy"])
            human_gap = (human_accuracy["video"]["per_class"][name]["accuracy"]
                         - human_accuracy["audio"]["per_class"][name]["accuracy"])
        except KeyError:
            continue  # a side did not see the class in both conditions
        gaps.append({"class": name, "model_gap": model_gap, "human_gap": human_gap})
    gaps.sort(key=lambda g: (-g["human_gap"], g["class"]))
    x, y = np.asarray([g["model_gap"] for g in gaps]), np.asarray([g["human_gap"] for g in gaps])
    kappa = {}
    for condition, rows in models.items():
        majority = humans_lib.majority_answers(pooled, condition)  # clip ids carry their seed
        both = [r for r in rows if r["clip_id"] in majority]
        if both:
            kappa[condition] = {"model": MODEL_OF_CONDITION[condition], "clips": len(both),
                                "value": cohen_kappa([r["chosen"] for r in both], [majority[r["clip_id"]] for r in both])}
    by_model = sorted(gaps, key=lambda g: (-g["model_gap"], g["class"]))
    return {
        "split": split, "humans": {"sources": sources, "simulated": simulated(first), "unknown_clip_rows": unknown},
        "human_accuracy": human_accuracy, "model_accuracy": model_accuracy, "gaps": gaps,
        "gap_correlation": correlation(x, y) if len(gaps) else None, "kappa": kappa,
        "strongest": {"models": {"visual": [g["class"] for g in by_model[:TOP]],
                                 "audio": [g["class"] for g in by_model[::-1][:TOP]]},
                      "humans": {"visual": [g["class"] for g in gaps[:TOP]],
                                 "audio": [g["class"] for g in gaps[::-1][:TOP]]}},
        "confusions": {
            "models": {c: _confusions([(r["truth"], r["chosen"]) for r in rows]) for c, rows in models.items()},
            "humans": {c: _confusions([(r["truth"], r["chosen"]) for r in human_rows if r["condition"] == c])
                       for c in humans_lib.CONDITIONS}},
    }

