"""A config file's ablations, run: `python -m distill_jax.sweep --config=configs/paper.py:... --workdir=ROOT`.

The config file's `sweep(add)` lists entries (dicts of dotted config keys -> values); each runs
as a whole study (`main.run`) into `ROOT/<entry name>`. Entries share the outputs of the stages
their changes do not reach: before an entry runs, each stage whose recorded config values
(`stage_configs.json`, the one place that says what a stage depends on: `main.STAGE_CONFIG`)
equal the entry's is copied from an earlier entry, or from `--base=DIR` (a finished run of the
same study), so a switch ablation reuses the evaluation and a loss ablation reuses everything
up to the labels. Afterwards ROOT/sweep.json and ROOT/sweep.md compare the entries by the
report's findings (differences with their 95 % CIs) and accuracies.

    --list        print the entries and exit
    --only=NAME   run one entry (its name as --list prints it)

Multi-host: run the same command on every host (as `distill_jax.main`); process 0 copies.
"""
from __future__ import annotations

import importlib.util
import re

from absl import app, flags, logging
from ml_collections import config_flags

from distill_jax import main as main_lib
from distill_jax import multihost

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The sweep's own flags, only when run as a program; --config, --workdir (ROOT) and the
    multi-host flags are distill_jax.main's."""
    flags.DEFINE_string("base", None, "A finished run of the same study whose outputs entries may reuse.")
    flags.DEFINE_bool("list", False, "Print the entries and exit.")
    flags.DEFINE_string("only", None, "Run only this entry.")


def entry_name(overrides: dict) -> str:
    """A directory name saying what the entry changes: "distill.loss=logits_distill.temperature=2.0"."""
    text = "_".join(f"{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}"
                    for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9._=,-]+", "-", text)


def entries(config_file: str) -> list[tuple[str, dict]]:
    """(name, overrides) of the config file's `sweep(add)`."""
    spec = importlib.util.spec_from_file_location("sweep_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "sweep"):
        raise ValueError(f"{config_file} has no sweep(add)")
    found = []
    module.sweep(lambda **overrides: found.append((entry_name(overrides), dict(overrides))))
    names = [n for n, _ in found]
    if len(set(names)) != len(names):
        raise ValueError(f"{config_file}: sweep entries with the same name: {names}")
    return found


def apply(config, overrides: dict):
    """`config` with the dotted keys of `overrides` set (unknown keys are an error naming them)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = config
            for part in parents:
                node = node[part]
            if leaf not in node:
                raise KeyError(f"sweep entry key {key!r} is not in the config")
            node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], tuple) else value
    config.lock()
    return config


def reuse(config, workdir, sources) -> dict[int, list[str]]:
    """Copy into `workdir` the outputs of every stage whose recorded values equal this config's,
    from the first of `sources` (earlier workdirs) that has them; per seed, the stages copied."""
    copied = {}
    for seed in config.seeds:
        one = main_lib.seed_config(config, seed)
        target = main_lib.seed_dir(workdir, seed)
        recorded = main_lib.recorded_stage_configs(target)
        done = copied.setdefault(int(seed), [])
        stages = main_lib.recorded_stages(one, config.stages)  # the audio-visual entry is a chain of its own
        chain_reused = True  # the chain's stages are reused up to the first that is not
        for stage in stages:
            if not chain_reused and stage != "audio_visual":
                continue
            values = main_lib.stage_values(one, stage)
            if recorded.get(stage) == values:
                continue  # already here (an earlier sweep run)
            source = None
            for candidate in sources:
                if main_lib.recorded_stage_configs(main_lib.seed_dir(candidate, seed)).get(stage) == values:
                    source = main_lib.seed_dir(candidate, seed)
                    break
            if source is None:  # this stage and every later one of the chain run here
                chain_reused = chain_reused and stage == "audio_visual"
                continue
            if multihost.is_main():
                for rel in main_lib.STAGE_OUTPUTS[stage]:
                    if (source / rel).exists():
                        multihost.copy(source / rel, target / rel)
                if stage == "distill":  # and the students' evaluations
                    for student in (source / "eval").glob("student_*"):
                        multihost.copy(student, target / "eval" / student.name)
            recorded[stage] = values
            done.append(stage)
        multihost.write_json(main_lib.stage_configs_file(target), recorded, indent=1, sort_keys=True)
    multihost.sync(f"sweep reuse into {workdir}")
    return copied


def summarize(root, names_and_overrides) -> dict:
    """ROOT/sweep.json and sweep.md: every finished entry's findings and accuracies."""
    root = multihost.path(root)
    table = {}
    for name, overrides in names_and_overrides:
        results_file = root / name / "results.json"
        if not results_file.exists():
            continue
        results = multihost.read_json(results_file)
        table[name] = {"overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
                       "findings": {f["name"]: {k: f.get(k) for k in ("split", "diff", "ci95", "p_value", "holds")}
                                    for f in results["findings"]},
                       "accuracy": results["accuracy"]}
    multihost.write_json(root / "sweep.json", table, indent=1)
    findings = sorted({f for entry in table.values() for f in entry["findings"]})
    lines = ["# Sweep", "", "a − b in accuracy points [95 % CI] per finding (the report's); yes = holds.", "",
             "| entry | " + " | ".join(findings) + " |", "|---|" + "---|" * len(findings)]
    for name, entry in table.items():
        cells = []
        for f in findings:
            cell = entry["findings"].get(f)
            if not cell or cell["diff"] is None:
                cells.append("-")
            else:
                lo, hi = cell["ci95"]
                cells.append(f"{100 * cell['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                             f"{'yes' if cell['holds'] else 'no'}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    multihost.write_text(root / "sweep.md", "\n".join(lines) + "\n")
    return table


def run(config, config_file: str, root, *, base=None, only: str | None = None) -> dict:
    """Run the sweep of `config_file` over `config` into `root`; returns the summary table."""
    found = entries(config_file)
    if only is not None and only not in {n for n, _ in found}:
        raise ValueError(f"--only={only!r}: entries are {[n for n, _ in found]}")
    root = multihost.path(root)
    sources = [multihost.path(base)] if base else []
    for name, overrides in found:
        workdir = root / name
        if only is None or name == only:
            entry_config = apply(config, overrides)
            copied = reuse(entry_config, workdir, sources)
            if multihost.is_main():
                print(f"== sweep entry {name}: reused {copied}", flush=True)
            main_lib.run(entry_config, str(workdir))
        sources.append(workdir)
    return summarize(root, found)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config_file = config_flags.get_config_filename(FLAGS["config"]).split(":")[0]  # without its arguments
    if FLAGS.list:
        for name, overrides in entries(config_file):
            print(f"{name}\t{overrides}")
        return
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.jax_distributed)
    run(FLAGS.config, config_file, FLAGS.workdir, base=FLAGS.base, only=FLAGS.only)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
