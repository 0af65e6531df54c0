"""The study, end to end: `python -m distill_jax.main --config=configs/<file>.py:<args> --workdir=DIR`.

With no flags it runs the toy world (configs/toy.py) into ./workdir and prints the results
table. Stages run in the order prepare, warm_start, evaluate, switch, label, distill, once per
seed of `config.seeds` (each seed repeats the whole study in DIR/seed_<s>/), then report, over
all seeds, into DIR (`--stages=evaluate,report` picks some); each skips what the workdir already
holds, so a rerun resumes. Config values that cannot work are refused before any stage starts.

Multi-host: every host runs the same command on the same workdir (a shared `gs://` bucket). On a
TPU VM `jax.distributed.initialize()` is called and finds the slice's hosts itself; on CPU/GPU
machines give `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. Every host computes, process 0
alone writes shared files, and every stage ends at a barrier (distill_jax/multihost.py).
"""
from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from distill_jax import multihost, sharding
from distill_jax.stages import common

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(_CONFIGS, "toy.py"), "Run config (configs/*.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdir", "Where every stage reads and writes.")
flags.DEFINE_list("stages", None, f"Stages to run (default: the config's), from {list(common.STAGES)}.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process run on CPU/GPU "
                    "machines (a multi-host TPU slice needs none of these three flags).")
flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (with --coordinator_address).")
flags.DEFINE_enum("jax_distributed", "auto", ["auto", "on", "off"], "jax.distributed.initialize(): auto = with the "
                  "three flags above, or on a TPU VM (JAX reads the slice's hosts from the TPU metadata).")


class ConfigError(ValueError):
    """A config value that cannot work, named."""


def check_config(config, stages) -> None:
    """Refuse, before any work, values that cannot work."""
    unknown = [s for s in stages if s not in common.STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(common.STAGES)}")
    seeds = tuple(config.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(x, int) and 0 <= x < 2**31 for x in seeds):
        raise ConfigError(f"config.seeds={seeds}: expected distinct integers in [0, 2**31), at least one")
    if config.direction not in common.ROLES:
        raise ConfigError(f"config.direction={config.direction!r}; expected one of {sorted(common.ROLES)}")
    from distill_jax.stages.label import SWITCH_MODES
    from distill_jax.train.losses import MODES

    bad = [m for m in config.distill.modes if m not in SWITCH_MODES]
    if bad or not config.distill.modes:
        raise ConfigError(f"config.distill.modes={tuple(config.distill.modes)}: each must be one of {SWITCH_MODES}")
    if "oracle" in config.distill.modes and not config.toy:
        raise ConfigError("config.distill.modes has 'oracle', which needs ground truth: toy world only")
    if config.distill.loss not in MODES:
        raise ConfigError(f"config.distill.loss={config.distill.loss!r}; expected one of {MODES}")
    if config.distill.lora.dropout:
        raise ConfigError(f"config.distill.lora.dropout={config.distill.lora.dropout}: LoRA dropout is not supported by "
                          "the train step (its RNG stream is not checkpointed, so a resumed run would differ); use 0")
    if config.data.question_strategy != "fixed" and not 2 <= config.data.num_options <= 26:
        raise ConfigError(f"config.data.num_options={config.data.num_options}; expected 2..26")
    if not config.toy:
        for modality in common.MODALITIES:
            path = config.models[modality].path
            if not path or not (multihost.path(path) / "config.json").exists():
                raise ConfigError(f"config.models.{modality}.path={path!r} is not a checkpoint directory "
                                  "(no config.json)")
        if not config.data.manifest or not multihost.path(config.data.manifest).exists():
            raise ConfigError(f"config.data.manifest={config.data.manifest!r} does not exist")
        if not multihost.path(config.switch.backbone).is_file():
            raise ConfigError(f"config.switch.backbone={config.switch.backbone!r} is not a file: the switch starts "
                              "from a pretrained PANN Cnn14 checkpoint (configs/paper.py: pann=...)")
    from distill_jax.layers.attention import IMPLEMENTATIONS
    from distill_jax.models.qwen2 import REMAT_POLICIES

    if config.distill.remat not in REMAT_POLICIES:
        raise ConfigError(f"config.distill.remat={config.distill.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    if config.models.attention_impl is not None and config.models.attention_impl not in IMPLEMENTATIONS:
        raise ConfigError(f"config.models.attention_impl={config.models.attention_impl!r}; expected None or one "
                          f"of {IMPLEMENTATIONS}")
    if config.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.compute_dtype={config.compute_dtype!r}; expected float32 or bfloat16")


# Outputs that depend on which model teaches: a workdir holding them belongs to one direction.
_DIRECTED_OUTPUTS = ("switch", "labels", "distill")


def check_workdir(config, workdir) -> None:
    """Refuse a workdir whose direction-dependent outputs were made with the other direction;
    print the config values that differ from the workdir's last run (outputs are reused by name)."""
    previous_file = workdir / "config.json"
    if not previous_file.exists():
        return
    previous = multihost.read_json(previous_file)
    seeds = sorted(n.name for n in workdir.iterdir() if n.name.startswith("seed_"))
    directed = sorted({d for n in seeds for d in _DIRECTED_OUTPUTS if (workdir / n / d).exists()})
    if previous.get("direction") != config.direction and directed:
        raise ConfigError(f"workdir {workdir} holds {directed} made with direction={previous.get('direction')!r}; "
                          f"config.direction={config.direction!r} needs another workdir (or delete those)")
    current = json.loads(config.to_json_best_effort())
    changed = sorted(k for k in set(current) | set(previous) if current.get(k) != previous.get(k) and k != "stages")
    if changed and multihost.is_main():
        print(f"note: config values under {changed} differ from this workdir's last run; finished outputs are "
              "reused as they are (delete a stage's outputs to redo it)", flush=True)


def make_mesh(config):
    try:
        return sharding.make_mesh(dict(config.mesh))
    except ValueError as e:
        raise ConfigError(f"config.mesh={dict(config.mesh)} does not fit the {jax.device_count()} devices: {e}") from e


def enable_compilation_cache(workdir, min_compile_time_s: float = 0.0) -> None:
    """Compiled programs are kept in <workdir>/jax_cache and reused by reruns and resumed runs.

    Every program is cached, not only those over JAX's default 1 s of compile time: the toy run's
    many small programs then compile once (benchmarks/compile_cache.py measures both).
    """
    jax.config.update("jax_compilation_cache_dir", str(multihost.path(workdir) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)


def seed_config(config, seed: int):
    """One seed's run config: `config` with `seed` set (the toy world, warm start, switch and
    distillation are all seeded by it)."""
    one = config.copy_and_resolve_references()
    with one.unlocked():
        one.seed = int(seed)
    one.lock()
    return one


def seed_dir(workdir, seed: int):
    """Where one seed's stage outputs live: every seed repeats the whole study."""
    return multihost.path(workdir) / f"seed_{int(seed)}"


def _record_time(timings_file, stage: str, seconds: float) -> None:
    timings = multihost.read_json(timings_file) if timings_file.exists() else {}
    multihost.write_json(timings_file, {**timings, stage: seconds}, indent=1)


def run(config, workdir: str, stages=None) -> list[common.Study]:
    """Run `stages` (default: the config's) of the study into `workdir`, once per seed of
    `config.seeds` (in `workdir/seed_<s>/`), then the report over all seeds (in `workdir`)."""
    from distill_jax.stages import distill, evaluate, label, prepare, report, switch, warm_start

    modules = {"prepare": prepare, "warm_start": warm_start, "evaluate": evaluate, "switch": switch,
               "label": label, "distill": distill}
    stages = list(stages or config.stages)
    check_config(config, stages)
    mesh = make_mesh(config)
    workdir = multihost.path(workdir)
    check_workdir(config, workdir)
    multihost.sync("workdir checked")  # before process 0 rewrites config.json
    multihost.write_text(workdir / "config.json", config.to_json_best_effort(indent=1, sort_keys=True) + "\n")
    enable_compilation_cache(workdir)
    studies = [common.Study(seed_config(config, seed), seed_dir(workdir, seed), mesh) for seed in config.seeds]
    with jax.set_mesh(mesh):
        for study in studies:
            study.workdir.mkdir(parents=True, exist_ok=True)
            tag = f"[seed {study.config.seed}] " if len(studies) > 1 else ""
            for stage in common.STAGES:
                if stage not in stages or stage == "report":
                    continue
                start = time.perf_counter()
                print(f"== {tag}{stage}", flush=True)
                modules[stage].run(study)
                multihost.sync(f"{stage} of seed {study.config.seed}")  # its outputs are complete on every host
                seconds = time.perf_counter() - start
                print(f"== {tag}{stage} done in {seconds:.1f} s", flush=True)
                _record_time(study.path("timings.json"), stage, seconds)  # seconds of each stage's latest run
        if "report" in stages:
            print("== report", flush=True)
            report.run(studies, workdir)
    return studies


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.jax_distributed)
    if jax.process_index() > 0:
        logging.set_verbosity(logging.ERROR)
    run(FLAGS.config, FLAGS.workdir, FLAGS.stages)


if __name__ == "__main__":
    app.run(main)
