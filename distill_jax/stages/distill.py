"""Distill: LoRA fine-tuning of the student on the label stage's targets, one run per switch mode.

Per clip, where the switch is closed the target is the teacher's letter ("labels") or its
letter distribution ("logits", KL at a temperature); elsewhere the student's own original
answer (anti-forgetting). This stage declares the training: the student with LoRA, the
letter objective (train/step.py), the training split with each mode's label records joined by
clip id in the input pipeline. The trainer (train/loop.py) runs it: checkpoints every N steps
(a killed run restarts from the last one and ends with the weights of an uninterrupted run),
metrics.jsonl + TensorBoard events, a progress line, a stop with a clear message on a
non-finite step. Then the PEFT export of the adapter and the distilled student's evaluation.

Writes distill/<mode>/{checkpoints, logs, batches.jsonl, adapter} and eval/student_<mode>/.
"""

from flax import nnx

from distill_jax import sharding
from distill_jax.models import lora
from distill_jax.stages.evaluate import accuracy, read_records, score_model
from distill_jax.stages.label import JoinTargets, distill_modes, labels_path
from distill_jax.train import loop
from distill_jax.train.step import distill_objective


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


def done(adapter) -> bool:
    return (adapter / "adapter_model.safetensors").exists()  # written after adapter_config.json


def train(study, mode: str, out):
    """Train (or resume) the adapter of switch mode `mode`; returns the student with trained LoRA."""
    cfg = study.config.distill
    steps = total_steps(study)
    updates = steps // cfg.accumulate_steps
    if updates < 2:
        raise ValueError(f"distill: {steps} steps / accumulate_steps {cfg.accumulate_steps} = {updates} optimizer "
                         "updates; a warmup-cosine schedule needs at least 2 (raise config.distill.max_steps/epochs)")
    labels = {r["clip_id"]: r for r in read_records(labels_path(study, mode))}
    transform = study.transform(study.student)
    dataset = study.dataset(study.student, study.config.label.split, batch_size=cfg.batch_size, train=True,
                            num_epochs=None, seed=study.config.seed, targets=JoinTargets(labels))
    objective = distill_objective(study.letter_ids(study.student), mode=cfg.loss, temperature=cfg.temperature,
                                  model_inputs=transform.model_inputs)
    trained = loop.train(
        student_with_lora(study), objective, iter(dataset),
        optimizer=loop.OptimizerConfig(learning_rate=cfg.learning_rate, warmup_steps=min(cfg.warmup_steps, updates - 1),
                                       total_steps=updates, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm,
                                       accumulate_steps=cfg.accumulate_steps),
        loop=loop.LoopConfig(steps=steps, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                             max_nonfinite_steps=cfg.max_nonfinite_steps),
        mesh=study.mesh, name=f"distill {mode}", workdir=out, trained=nnx.LoRAParam,
        static_inputs=transform.static_inputs, summary=lambda m: f"teacher-used {m['closed_fraction']:.2f}",
        log_clip_ids=True, observe=study.observer(f"student_{mode}", "train", study.config.label.split,
                                                  study.student))
    study.input_log.save()
    return trained


def run(study) -> None:
    cfg = study.config.distill
    for mode in distill_modes(study):
        out = study.path("distill", mode)
        adapter = out / "adapter"
        name = f"student_{mode}"
        todo = [s for s in cfg.eval_splits if not study.records_path(name, s).exists()]
        if done(adapter) and not todo:
            print(f"distill: {mode} done ({adapter}), skipped")
            continue
        model = train(study, mode, out)  # a finished run only restores its last checkpoint
        if not done(adapter):
            base = study.config.models[study.student].path or str(study.model_dir(study.student))  # a hub id as is
            lora.export_peft(model, adapter, base_model_name_or_path=base)
        for split in todo:
            records = score_model(study, model, study.student, split, study.records_path(name, split),
                                  batch_size=study.config.evaluate.batch_size, name=name)
            print(f"distill: {mode} student on {split}: {accuracy(records, study.classes_of(split))['overall']:.3f}",
                  flush=True)
        del model  # one student in memory at a time
