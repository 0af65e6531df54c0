"""Prepare: the clips as TFRecord shards + a manifest, and (toy world) the tokenizer.

Toy world: generates the procedural clips and converts them (`data_pipelines.toy_world`: the
unseen classes through the AudioSet converter, as a real run's), and writes a tiny Qwen2
tokenizer whose corpus holds the class names. Real data: with config.data.vggsound.csv the clips
are converted here (`data_pipelines.vggsound`, into the run's data/vggsound/); otherwise the
manifest the config names must exist (converted beforehand); this stage checks it and prints
its report. Both: the unseen split's manifest (config.data.unseen) is read and
checked (no class of it distilled on). Reruns skip finished work (the converter skips
finished shards). On several hosts, process 0 prepares and the others wait at a barrier. A
remote (gs://) workdir gets the toy world through a local staging directory.
"""
from __future__ import annotations

import os

from data_pipelines import converter, toy_world
from distill_jax import multihost
from distill_jax.toy_tokenizer import make_qwen2_tokenizer

TOY_TOKENIZER_VOCAB = 1024


def run(study) -> None:
    """Process 0 prepares; the other hosts wait for it, then read what it wrote."""
    if multihost.is_main():
        _prepare(study)
    multihost.sync("prepare")


def _prepare(study) -> None:
    config = study.config
    if not config.toy:
        if config.data.vggsound.csv:
            _convert_vggsound(study)  # prints the manifest's report
        else:
            path = study.manifest_path()
            if not path.exists():
                raise FileNotFoundError(f"config.data.manifest {path} does not exist: convert the clips first "
                                        "(python -m data_pipelines.vggsound --csv ... --video-dir ... --out ...)")
            converter.print_report(study.manifest)
        _check_unseen(study)
        return
    if not study.manifest_path().exists() or not study.unseen_manifest_path().exists():
        print("prepare: generating the toy world", flush=True)
        world = config.data.world
        with multihost.staged(study.path("data")) as out:  # the generator writes local files
            toy_world.main(["--out", out, "--seed", str(config.seed), "--scale", str(world.scale),
                            "--fps", str(world.fps), "--workers", str(world.workers or os.cpu_count())])
    tokenizer_dir = study.path("tokenizer")
    if not (tokenizer_dir / "tokenizer.json").exists():
        with multihost.atomic_dir(tokenizer_dir, last="tokenizer.json") as out:  # whole or not at all
            make_qwen2_tokenizer(out, words=study.classes, vocab_size=TOY_TOKENIZER_VOCAB)
    converter.print_report(study.manifest)
    _check_unseen(study)


def _convert_vggsound(study) -> None:
    """config.data.vggsound's CSV and clips -> TFRecords + manifest in <run workdir>/data/vggsound/
    (data_pipelines.vggsound; a rerun skips the finished shards, so later seeds only check them)."""
    from data_pipelines import vggsound

    cfg = study.config.data.vggsound
    target = study.manifest_path().parent
    print(f"prepare: converting {cfg.csv} (clips in {cfg.video_dir}) into {target}", flush=True)
    with multihost.staged(target) as out:
        vggsound.main(["--csv", cfg.csv, "--video-dir", cfg.video_dir, "--out", out, "--analysis-size",
                       str(cfg.analysis_size), "--workers", str(cfg.workers or os.cpu_count()), "--no-progress"])


def _check_unseen(study) -> None:
    """The unseen split's manifest, read and checked against the run's now (its classes new to the
    distillation), not hours later in the evaluate stage."""
    path = study.unseen_manifest_path()
    if path is None:
        return
    if not path.exists():
        raise FileNotFoundError(f"config.data.unseen.manifest {path} does not exist: convert AudioSet's evaluation "
                                "segments first (python -m data_pipelines.audioset --csv ... --keep ...)")
    converter.print_report(study.unseen_manifest)
