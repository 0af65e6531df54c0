"""Distill: LoRA fine-tuning of the student on the label stage's targets, one run per switch mode.

Per clip, where the switch is closed the target is the teacher's letter ("labels") or its
letter distribution ("logits", KL at a temperature); elsewhere the student's own original
answer (anti-forgetting). The loop around the pure jitted `train_step` (train/step.py):
batches from the Grain pipeline over the mesh, orbax checkpoints every N steps (LoRA,
optimizer state, step, iterator position: a killed run restarts from the last one and ends
with the weights of an uninterrupted run), metrics.jsonl + TensorBoard events, a progress
line, a stop with a clear message on a non-finite loss (the last checkpoint stays the last
good one), the PEFT export of the adapter, and the distilled student's evaluation.

Writes distill/<mode>/{checkpoints, logs, batches.jsonl, adapter} and eval/student_<mode>/.
"""

import json
import os
import time

import flax
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx

from distill_jax import sharding
from distill_jax.models import lora
from distill_jax.stages.common import place_batch
from distill_jax.stages.evaluate import accuracy, read_records, score_split
from distill_jax.stages.label import labels_path, targets_for
from distill_jax.train.checkpoint import TrainCheckpointer
from distill_jax.train.metrics import MetricWriter
from distill_jax.train.step import OptimizerConfig, init_state, make_optimizer, make_train_step, merge_model, \
    split_inputs


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Averages over a logging window of the train step's metrics."""
    loss: clu_metrics.Average.from_output("loss")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    closed_fraction: clu_metrics.Average.from_output("closed_fraction")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without saving that step."""


def total_steps(study) -> int:
    cfg = study.config.distill
    if cfg.max_steps:
        return int(cfg.max_steps)
    clips = study.num_examples(study.config.label.split)
    steps = cfg.epochs * clips // cfg.batch_size
    if steps < 1:
        raise ValueError(f"{clips} clips of {study.config.label.split!r} fill no batch of {cfg.batch_size}")
    return steps


def student_with_lora(study):
    cfg = study.config.distill
    model = study.load_model(study.student, remat=cfg.remat)
    lora.apply_lora(model, lora.LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                           target_modules=tuple(cfg.lora.targets)),
                    rngs=nnx.Rngs(study.config.seed + 100))
    sharding.shard_model(model, study.mesh)
    return model


def _truncate_log(path: str, step: int) -> None:
    """Drop the JSON lines of steps after `step` (a killed run's steps that the resumed run repeats)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


def done(adapter: str) -> bool:
    return os.path.exists(os.path.join(adapter, "adapter_model.safetensors"))  # written after adapter_config.json


def train(study, mode: str, out: str):
    """Train (or resume) the adapter of switch mode `mode`; returns the student with trained LoRA."""
    cfg = study.config.distill
    steps = total_steps(study)
    labels = {r["clip_id"]: r for r in read_records(labels_path(study, mode))}
    model = student_with_lora(study)
    updates = steps // cfg.accumulate_steps
    if updates < 2:
        raise ValueError(f"distill: {steps} steps / accumulate_steps {cfg.accumulate_steps} = {updates} optimizer "
                         "updates; a warmup-cosine schedule needs at least 2 (raise config.distill.max_steps/epochs)")
    tx = make_optimizer(OptimizerConfig(learning_rate=cfg.learning_rate, warmup_steps=min(cfg.warmup_steps, updates - 1),
                                        total_steps=updates, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm,
                                        accumulate_steps=cfg.accumulate_steps))
    graphdef, state = init_state(model, tx)
    train_step = make_train_step(graphdef, tx, study.letter_ids(study.student), mode=cfg.loss,
                                 temperature=cfg.temperature)
    dataset = study.dataset(study.student, study.config.label.split, batch_size=cfg.batch_size, train=True,
                            num_epochs=None, seed=study.config.seed)
    iterator = iter(dataset)
    checkpointer = TrainCheckpointer(os.path.join(out, "checkpoints"), every=cfg.checkpoint_every)
    restored = checkpointer.restore_latest(state, iterator)
    if restored is not None:
        state = restored
        print(f"distill {mode}: resumed from step {int(state['step'])}", flush=True)
    _truncate_log(os.path.join(out, "batches.jsonl"), int(state["step"]))
    _truncate_log(os.path.join(out, "logs", "metrics.jsonl"), int(state["step"]))
    writer = MetricWriter(os.path.join(out, "logs"))
    inputs_of = study.model_inputs(study.student)
    step, start, start_step = int(state["step"]), time.perf_counter(), int(state["step"])
    window = None
    try:
        with open(os.path.join(out, "batches.jsonl"), "a") as order_log:
            while step < steps:
                batch = next(iterator)
                targets = targets_for(batch["clip_id"], batch["valid"], labels)
                arrays, static = split_inputs(model, inputs_of(batch))
                state, metrics = train_step(state, place_batch({"inputs": arrays, "targets": targets}, study.mesh),
                                            static)
                step += 1
                loss = float(metrics["loss"])
                if not np.isfinite(loss):
                    raise NonFiniteLossError(
                        f"distill {mode}: loss {loss} at step {step}; stopped without saving it. The last "
                        f"good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}")
                order_log.write(json.dumps({"step": step, "clip_ids": [str(c) for c in batch["clip_id"]]}) + "\n")
                order_log.flush()  # survives a kill
                update = TrainMetrics.single_from_model_output(**metrics)
                window = update if window is None else window.merge(update)
                checkpointer.save(state, iterator, force=step == steps)
                if step % cfg.log_every == 0 or step == steps:
                    averages = {k: float(v) for k, v in window.compute().items()}
                    window = None
                    writer.write(step, averages)
                    writer.flush()
                    rate = (step - start_step) / (time.perf_counter() - start)
                    print(f"distill {mode}: step {step}/{steps} loss {averages['loss']:.4f} "
                          f"teacher-used {averages['closed_fraction']:.2f} {rate:.2f} steps/s "
                          f"ETA {(steps - step) / rate:.0f} s", flush=True)
    finally:
        writer.close()
        checkpointer.close()
    return merge_model(graphdef, state)


def run(study) -> None:
    cfg = study.config.distill
    for mode in cfg.modes:
        out = study.path("distill", mode)
        adapter = os.path.join(out, "adapter")
        name = f"student_{mode}"
        todo = [s for s in cfg.eval_splits if not os.path.exists(study.records_path(name, s))]
        if done(adapter) and not todo:
            print(f"distill: {mode} done ({adapter}), skipped")
            continue
        model = train(study, mode, out)  # a finished run only restores its last checkpoint
        if not done(adapter):
            lora.export_peft(model, adapter, base_model_name_or_path=study.model_dir(study.student))
        for split in todo:
            records = score_split(study, model, study.student, split, study.records_path(name, split),
                                  batch_size=study.config.evaluate.batch_size)
            print(f"distill: {mode} student on {split}: {accuracy(records, study.classes)['overall']:.3f}",
                  flush=True)
        del model  # one student in memory at a time
