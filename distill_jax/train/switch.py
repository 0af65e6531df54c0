"""The heuristic switch: a Cnn14 binary classifier that predicts, per clip, whether the teacher
modality is the better teacher there (paper section 4: PANN fine-tuned on the analysis set).

Labels come from the two models' per-clip answers (`sample_labels`, `class_labels`). The
switch is a Cnn14 whose embedding (fc1 + ReLU) feeds a one-logit head, trained with BCE
weighted for class imbalance (= torch BCEWithLogitsLoss(pos_weight=n_neg / n_pos)):
- finetune="head": the backbone is frozen in eval mode (running statistics, no dropout or
  SpecAugment), so its embeddings are computed once and only the head trains on them;
- finetune="full": every parameter trains, the backbone in train mode (batch statistics
  updating the running ones, dropout, SpecAugment).
`make_predict(switch)` is the labelling stage's jitted batch `predict(waveforms) -> prob`;
`save_switch` / `restore_switch` keep it with orbax.

With `feature_dim > 0` the head also sees per-clip side features (the study's `switch.inputs`:
the visual model's pooled vision embedding, or both models' letter-distribution features),
standardised by the training clips' mean and standard deviation (kept with the weights) and
concatenated to the Cnn14 embedding: `switch(waveform, features)`.
"""
from __future__ import annotations

import dataclasses
import functools
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data_pipelines.audio_resample import resample
from distill_jax.layers.linear import Linear
from distill_jax.sharding import abstract_model
from distill_jax.models.cnn14 import Cnn14, Cnn14Config, check_finite, check_waveform, default_rngs

FINETUNE_MODES = ("head", "full")
LABEL_MODES = ("sample", "class")
SAMPLE_RULES = ("right_wrong", "confidence")


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
    """What the switch is and how it trains. `threshold` turns probabilities into decisions."""

    backbone: Cnn14Config = Cnn14Config.preset("cnn14_16k")
    finetune: str = "head"  # "head" (frozen backbone + head) or "full" (fine-tune everything)
    label_mode: str = "sample"  # "sample" or "class" (see make_labels)
    sample_rule: str = "right_wrong"  # "right_wrong" or "confidence"
    class_margin: float = 0.0  # class-level: teacher accuracy - student accuracy must exceed this
    threshold: float = 0.5
    learning_rate: float = 1e-3
    batch_size: int = 32
    epochs: int = 10
    pos_weight: float | None = None  # None: n_negative / n_positive of the training labels
    seed: int = 0
    max_nonfinite_steps: int = 3  # consecutive non-finite (skipped) steps before training stops
    feature_dim: int = 0  # per-clip side features concatenated to the embedding (0: audio only)

    def __post_init__(self):
        checks = (("finetune", FINETUNE_MODES), ("label_mode", LABEL_MODES), ("sample_rule", SAMPLE_RULES))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"SwitchConfig.{name}={getattr(self, name)!r}; allowed: {allowed}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"SwitchConfig.threshold must be in (0, 1), got {self.threshold}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size}, {self.epochs}")
        if self.feature_dim < 0:
            raise ValueError(f"feature_dim must be >= 0, got {self.feature_dim}")
        if self.pos_weight is not None and not self.pos_weight > 0:
            raise ValueError(f"pos_weight must be > 0 (or None), got {self.pos_weight}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone"] = self.backbone.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SwitchConfig":
        return cls(**{**d, "backbone": Cnn14Config.from_dict(d["backbone"])})


# ----------------------------------------------------------------------------- labels

def _column(name: str, values, n: int | None = None, dtype=None) -> np.ndarray:
    a = np.asarray(values, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per clip), got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries, expected {n} (one per clip)")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite entries at clips {np.flatnonzero(~np.isfinite(a)).tolist()}")
    return a


def correct(answers, truth) -> np.ndarray:
    """Per clip: is the model's answer (letter or class) the true one?"""
    truth = _column("truth", truth)
    return _column("answers", answers, len(truth)) == truth


def sample_labels(teacher_correct, student_correct, *, rule: str = "right_wrong",
                  teacher_confidence=None, student_confidence=None) -> np.ndarray:
    """Sample-level switch labels (int32 0/1 per clip).

    rule="right_wrong": 1 where the teacher is right and the student wrong.
    rule="confidence": 1 where the teacher's confidence exceeds the student's; a confidence
      is the probability the model gives the correct choice (from its letter distribution).
    """
    t = _column("teacher_correct", teacher_correct, dtype=bool)
    s = _column("student_correct", student_correct, len(t), dtype=bool)
    if rule == "right_wrong":
        return (t & ~s).astype(np.int32)
    if rule == "confidence":
        if teacher_confidence is None or student_confidence is None:
            raise ValueError("rule='confidence' needs teacher_confidence and student_confidence")
        tc = _column("teacher_confidence", teacher_confidence, len(t), np.float64)
        sc = _column("student_confidence", student_confidence, len(t), np.float64)
        return (tc > sc).astype(np.int32)
    raise ValueError(f"unknown sample rule {rule!r}; allowed: {SAMPLE_RULES}")


def class_labels(classes, teacher_correct, student_correct, *, margin: float = 0.0
                 ) -> tuple[np.ndarray, dict[Any, dict[str, float]]]:
    """Class-level switch labels: 1 for every clip of a class where the teacher's accuracy on that
    class exceeds the student's by more than `margin`.

    Returns (labels [clips] int32, {class: {"teacher", "student", "clips", "label"}}).
    """
    classes = _column("classes", classes)
    t = _column("teacher_correct", teacher_correct, len(classes), dtype=bool)
    s = _column("student_correct", student_correct, len(classes), dtype=bool)
    labels = np.zeros(len(classes), np.int32)
    table = {}
    for c in np.unique(classes):
        clips = classes == c
        acc_t, acc_s = float(t[clips].mean()), float(s[clips].mean())
        label = int(acc_t - acc_s > margin)
        labels[clips] = label
        table[c.item() if hasattr(c, "item") else c] = dict(teacher=acc_t, student=acc_s, clips=int(clips.sum()),
                                                            label=label)
    return labels, table


def make_labels(config: SwitchConfig, *, truth, teacher_answers, student_answers, classes=None,
                teacher_confidence=None, student_confidence=None) -> np.ndarray:
    """Switch labels from both models' per-clip answers, by `config.label_mode` / `sample_rule`."""
    t, s = correct(teacher_answers, truth), correct(student_answers, truth)
    if config.label_mode == "class":
        if classes is None:
            raise ValueError("label_mode='class' needs each clip's class (classes=)")
        return class_labels(classes, t, s, margin=config.class_margin)[0]
    return sample_labels(t, s, rule=config.sample_rule, teacher_confidence=teacher_confidence,
                         student_confidence=student_confidence)


# ----------------------------------------------------------------------------- loss and metrics

def imbalance_weight(labels) -> float:
    """n_negative / n_positive: BCE's positive-class weight that balances the two classes."""
    labels = _column("labels", labels)
    pos = int(np.sum(labels == 1))
    neg = int(np.sum(labels == 0))
    if pos + neg != labels.size:
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(np.unique(labels).tolist()) - {0, 1})}")
    if pos == 0 or neg == 0:
        raise ValueError(f"labels are all {'negative' if pos == 0 else 'positive'} ({labels.size} clips): "
                         "the switch has nothing to learn")
    return neg / pos


def bce_loss(logits: jax.Array, labels: jax.Array, pos_weight: float | jax.Array) -> jax.Array:
    """= torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight): mean of w * BCE, w = pos_weight on positives."""
    labels = labels.astype(jnp.float32)
    per_clip = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
    return jnp.mean(jnp.where(labels > 0.5, pos_weight, 1.0) * per_clip)


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, balanced accuracy, precision, recall (0.0 where undefined, as sklearn's zero_division=0)."""
    y = _column("labels", labels).astype(bool)
    pred = _column("probs", probs, len(y), np.float64) >= threshold
    tp, tn = int(np.sum(pred & y)), int(np.sum(~pred & ~y))
    fp, fn = int(np.sum(pred & ~y)), int(np.sum(~pred & y))
    recall = tp / (tp + fn) if tp + fn else 0.0
    specificity = tn / (tn + fp) if tn + fp else 0.0
    return dict(accuracy=(tp + tn) / len(y), balanced_accuracy=(recall + specificity) / 2,
                precision=tp / (tp + fp) if tp + fp else 0.0, recall=recall,
                majority_baseline=max(y.mean(), 1 - y.mean()), clips=len(y), positives=int(y.sum()))


# ----------------------------------------------------------------------------- the model

class FeatureStat(nnx.BatchStat):
    """The side features' standardisation (set from the training clips by `fit`; saved, not trained)."""


class Switch(nnx.Module):
    """Cnn14 backbone + a one-logit head on its embedding (and, with `config.feature_dim`, the
    standardised side features): `switch(waveform [B, N], features [B, D] | None) -> logits [B]`."""

    def __init__(self, config: SwitchConfig, *, rngs: nnx.Rngs, backbone: Cnn14 | None = None):
        if backbone is not None and backbone.config != config.backbone:
            raise ValueError(f"backbone config {backbone.config} differs from SwitchConfig.backbone {config.backbone}")
        self.config = config
        self.backbone = backbone if backbone is not None else Cnn14(config.backbone, rngs=rngs)
        self.head = Linear(config.backbone.embedding_dim + config.feature_dim, 1, axes=("cnn_embed", "classes"),
                           use_bias=True, kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
        if config.feature_dim:
            self.feature_mean = FeatureStat(jnp.zeros((config.feature_dim,), jnp.float32))
            self.feature_scale = FeatureStat(jnp.ones((config.feature_dim,), jnp.float32))

    def __call__(self, waveform: jax.Array, features: jax.Array | None = None) -> jax.Array:
        embedding = self.backbone(waveform)["embedding"]
        if self.config.feature_dim:
            if features is None or features.shape[-1] != self.config.feature_dim:
                raise ValueError(f"this switch takes {self.config.feature_dim} side features per clip, got "
                                 f"{None if features is None else features.shape}")
            standard = (features.astype(jnp.float32) - self.feature_mean[...]) / self.feature_scale[...]
            embedding = jnp.concatenate([embedding, standard.astype(embedding.dtype)], axis=-1)
        return self.head(embedding)[:, 0]

    def set_feature_stats(self, features: np.ndarray) -> None:
        """Standardise side features by these (training) clips' mean and standard deviation."""
        features = np.asarray(features, np.float64)
        self.feature_mean[...] = jnp.asarray(features.mean(0), jnp.float32)
        self.feature_scale[...] = jnp.asarray(np.maximum(features.std(0), 1e-6), jnp.float32)


def _as_batch(waveforms, config: SwitchConfig, sample_rate: int | None) -> np.ndarray:
    """[B, N] float32 at the backbone's sample rate (resampled with data_pipelines.audio_resample)."""
    if isinstance(waveforms, (list, tuple)):
        lengths = {np.shape(w) for w in waveforms}
        if len(lengths) != 1:
            raise ValueError(f"clips in one call must have equal length, got shapes {sorted(lengths)}")
        waveforms = np.stack(waveforms)
    x = np.asarray(waveforms)
    if x.ndim != 2:
        raise ValueError(f"waveforms must be [clips, samples], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"waveforms must be floating-point samples, got dtype {x.dtype}")
    rate = config.backbone.sample_rate
    if sample_rate is not None and sample_rate != rate:
        check_finite(x, name="waveforms")
        x = resample(x, sample_rate, rate)
    x = x.astype(np.float32)
    check_waveform(x, config.backbone, name=f"waveforms (at {rate} Hz)")
    return x


def _batches(n: int, batch_size: int):
    """Index blocks of batch_size covering range(n); the last one wraps around (fixed shapes, one compile)."""
    for start in range(0, n, batch_size):
        yield np.arange(start, start + batch_size) % n, min(batch_size, n - start)


def _eval_copy(module: nnx.Module) -> nnx.Module:
    """The same arrays in a module object set to eval mode (the caller's module keeps its mode)."""
    copy = nnx.merge(*nnx.split(module))
    copy.eval()
    return copy


@partial(jax.jit, static_argnums=0)
def _probabilities(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, features=None) -> jax.Array:
    return jax.nn.sigmoid(nnx.merge(graphdef, state)(x, features))


@partial(jax.jit, static_argnums=0)
def _embeddings(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x)["embedding"]


def _run_batched(fn, graphdef, state, x: np.ndarray, batch_size: int, width: tuple[int, ...] = (),
                 features: np.ndarray | None = None) -> np.ndarray:
    out = np.empty((len(x), *width), np.float32)
    for index, real in _batches(len(x), batch_size):
        extra = () if features is None else (features[index],)
        out[index[:real]] = np.asarray(fn(graphdef, state, x[index], *extra))[:real]
    return out


def _as_features(features, config: SwitchConfig, n: int) -> np.ndarray | None:
    """[clips, feature_dim] float32 (None for an audio-only switch); a wrong shape or a non-finite
    value is an error naming it."""
    if not config.feature_dim:
        if features is not None:
            raise ValueError("this switch takes no side features (SwitchConfig.feature_dim is 0)")
        return None
    f = np.asarray(features, np.float32) if features is not None else None
    if f is None or f.shape != (n, config.feature_dim):
        raise ValueError(f"side features must be [{n}, {config.feature_dim}] (clips, feature_dim), got "
                         f"{None if f is None else f.shape}")
    check_finite(f, name="side features")
    return f


def make_predict(switch: Switch, *, batch_size: int = 32, sample_rate: int | None = None
                 ) -> Callable[[Any], np.ndarray]:
    """A batch `predict(waveforms [clips, N]) -> prob [clips]` (jitted, eval mode, fixed batch shape).

    sample_rate: the waveforms' rate; resampled to the backbone's when it differs.
    Bad input (NaN/inf, clips shorter than Cnn14's minimum, not 2-D) is a ValueError naming it.
    Compiled once per (switch structure, batch_size, clip length), shared between switches.
    """
    graphdef, state = nnx.split(_eval_copy(switch))

    def predict(waveforms, features=None) -> np.ndarray:
        x = _as_batch(waveforms, switch.config, sample_rate)
        return _run_batched(_probabilities, graphdef, state, x, batch_size,
                            features=_as_features(features, switch.config, len(x)))

    return predict


@functools.lru_cache(maxsize=8)
def _probability_program(graphdef: nnx.GraphDef, mesh):
    """One jitted program per switch structure and mesh: scoring split after split compiles once."""
    from distill_jax.train.loop import batch_sharding

    @partial(jax.jit, out_shardings=batch_sharding(mesh))
    def probabilities(state, batch):
        return jax.nn.sigmoid(nnx.merge(graphdef, state)(batch["waveform"], batch.get("switch_features")))

    return probabilities


def probability_scorer(switch: Switch, mesh):
    """`compute(placed batch, static) -> prob [B]` of the switch in eval mode on `batch["waveform"]`
    (16 kHz, the backbone's rate) and `batch["switch_features"]` when it takes side features, for
    `scoring.score_split` on every host."""
    from distill_jax import sharding

    graphdef, state = nnx.split(sharding.shard_model(_eval_copy(switch), mesh))
    program = _probability_program(graphdef, mesh)
    return lambda batch, static: program(state, batch)


def embeddings(backbone: Cnn14, waveforms: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Eval-mode Cnn14 embeddings [clips, embedding_dim] (what a frozen backbone feeds the head)."""
    graphdef, state = nnx.split(_eval_copy(backbone))
    return _run_batched(_embeddings, graphdef, state, waveforms, batch_size, (backbone.config.embedding_dim,))


# ----------------------------------------------------------------------------- training

def switch_objective(pos_weight: float):
    """`loss_fn(model, batch, static)` for the trainer (`train.loop`): balanced BCE of the
    switch's logit on `batch["waveform"]` against `batch["switch_label"]`."""

    def loss_fn(model, batch, static):
        logits = model(batch["waveform"], batch.get("switch_features"))
        logits = logits[:, 0] if logits.ndim == 2 else logits
        return bce_loss(logits, batch["switch_label"], pos_weight), {}

    return loss_fn


def prepare_training(config: SwitchConfig, backbone: Cnn14 | None = None):
    """(switch, trained filter, mutable filter, optimizer) for `train.loop.train`.

    finetune="head": the backbone in eval mode (running statistics, no dropout or SpecAugment)
    and frozen, the head trained; "full": everything trained, the backbone in train mode. The
    non-parameter variables (BatchNorm statistics, dropout RNG counters) change as they are used.
    """
    from distill_jax.train.loop import OptimizerConfig

    switch = Switch(config, rngs=default_rngs(config.seed), backbone=backbone)
    if config.finetune == "head":
        switch.backbone.eval()
        trained = nnx.All(nnx.Param, nnx.PathContains("head"))
    else:
        switch.train()
        trained = nnx.Param
    optimizer = OptimizerConfig(learning_rate=config.learning_rate, schedule="constant", warmup_steps=0,
                                weight_decay=0.0, clip_norm=None)  # = optax.adam
    return switch, trained, nnx.Not(nnx.Param), optimizer


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, *, process_index: int = 0,
                  process_count: int = 1, features: np.ndarray | None = None):
    """This host's part of each global batch of in-memory clips: a fresh permutation of all clips
    per epoch (seeded), the last batch of an epoch wrapping around (fixed shapes); every host holds
    all clips and takes rows [i * B/N, (i + 1) * B/N) of each batch, so N hosts train on the
    batches one host would."""
    if batch_size % process_count:
        raise ValueError(f"switch batch_size {batch_size} is not divisible by the {process_count} hosts")
    local = batch_size // process_count
    order = np.random.RandomState(seed)
    while True:
        perm = order.permutation(len(x))
        for index, _ in _batches(len(x), batch_size):
            rows = perm[index][process_index * local:(process_index + 1) * local]
            batch = {"waveform": x[rows], "switch_label": y[rows], "clip_id": np.asarray([str(i) for i in rows])}
            if features is not None:
                batch["switch_features"] = features[rows]
            yield batch


def fit(config: SwitchConfig, x, y, *, mesh, backbone: Cnn14 | None = None, sample_rate: int | None = None,
        features=None, log: Callable[[str], None] | None = None) -> tuple[Switch, dict[str, Any]]:
    """Train a switch through the trainer (`train.loop`) on every host's copy of the clips `x`
    (and their side `features` when config.feature_dim > 0) and their 0/1 labels; returns
    (switch in eval mode, {pos_weight, loss per epoch})."""
    from distill_jax import sharding
    from distill_jax.train import loop

    x = _as_batch(x, config, sample_rate)
    y = _column("labels", y, len(x)).astype(np.int32)
    features = _as_features(features, config, len(x))
    balancing = imbalance_weight(y)  # also checks the labels are 0/1 with both classes present
    pos_weight = config.pos_weight if config.pos_weight is not None else balancing
    switch, trained, mutable, optimizer = prepare_training(config, backbone)
    if features is not None:
        switch.set_feature_stats(features)
    sharding.shard_model(switch, mesh)
    per_epoch = -(-len(x) // config.batch_size)
    history = []
    batches = array_batches(x, y, config.batch_size, config.seed, process_index=jax.process_index(),
                            process_count=jax.process_count(), features=features)
    switch = loop.train(switch, switch_objective(pos_weight), batches, optimizer=optimizer,
                        loop=loop.LoopConfig(steps=config.epochs * per_epoch, log_every=per_epoch,
                                             max_nonfinite_steps=config.max_nonfinite_steps), mesh=mesh,
                        name="switch", trained=trained, mutable=mutable, history=history)
    losses = [averages["loss"] for _, averages in history]
    if log:
        for epoch, loss in enumerate(losses):
            log(f"switch epoch {epoch + 1}/{config.epochs}: loss {loss:.4f}")
    switch.eval()
    return switch, {"pos_weight": float(pos_weight), "loss": losses}


def train_switch(config: SwitchConfig, waveforms, labels, *, sample_rate: int | None = None,
                 eval_waveforms=None, eval_labels=None, backbone: Cnn14 | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[Switch, dict[str, Any]]:
    """Train a switch on in-memory clips and 0/1 labels, on one device; returns (switch in eval
    mode, report). The study's switch stage runs `fit` on its mesh the same way.

    backbone: a (pretrained, e.g. `load_pann`) Cnn14 to start from; default: random init. With
      finetune="full" it is trained in place (pass `nnx.clone(backbone)` to keep the original).
    sample_rate: the clips' rate, when it differs from the backbone's (they are resampled).
    The report holds pos_weight, the mean loss per epoch, and `binary_metrics` on the training
    clips and, when given, on the evaluation clips, at `config.threshold`.
    """
    from distill_jax import sharding

    x = _as_batch(waveforms, config, sample_rate)
    y = _column("labels", labels, len(x)).astype(np.int32)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        switch, report = fit(config, x, y, mesh=mesh, backbone=backbone, log=log)
    predict = make_predict(switch, batch_size=config.batch_size)
    report["train"] = binary_metrics(y, predict(x), config.threshold)
    if eval_waveforms is not None:
        ex = _as_batch(eval_waveforms, config, sample_rate)
        report["eval"] = binary_metrics(_column("eval_labels", eval_labels, len(ex)), predict(ex), config.threshold)
    return switch, report


# ----------------------------------------------------------------------------- checkpoints

def save_switch(switch: Switch, directory) -> str:
    """Write `switch_config.json` and an orbax checkpoint of the parameters and running statistics
    (every host calls it; process 0 writes the config; `directory` may be gs://)."""
    import orbax.checkpoint as ocp

    from distill_jax import multihost

    directory = multihost.path(directory)
    multihost.write_json(directory / "switch_config.json", switch.config.to_dict(), indent=1, sort_keys=True)
    weights = nnx.to_pure_dict(nnx.state(switch, (nnx.Param, nnx.BatchStat)))  # FeatureStat is a BatchStat
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "state", weights, force=True)
    return str(directory)


def restore_switch(directory, mesh=None) -> Switch:
    """The switch saved by `save_switch`, in eval mode (dropout streams restart from config.seed);
    replicated over `mesh` when given (every host of a multi-host run calls it)."""
    import orbax.checkpoint as ocp

    from distill_jax import multihost

    directory = multihost.path(directory)
    if not (directory / "switch_config.json").exists():
        raise FileNotFoundError(f"{directory}: no switch_config.json (not a save_switch directory)")
    config = SwitchConfig.from_dict(multihost.read_json(directory / "switch_config.json"))
    abstract = abstract_model(lambda: Switch(config, rngs=default_rngs(config.seed)))
    graphdef, weights, _ = nnx.split(abstract, (nnx.Param, nnx.BatchStat), ...)
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated),
                          nnx.to_pure_dict(weights))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory / "state", target)
    nnx.replace_by_pure_dict(weights, restored)
    rngs = jax.jit(lambda: nnx.state(Switch(config, rngs=default_rngs(config.seed)), nnx.RngState))()
    switch = nnx.merge(graphdef, weights, rngs)
    switch.eval()
    return switch


__all__ = ["SwitchConfig", "Switch", "sample_labels", "class_labels", "make_labels", "correct", "imbalance_weight",
           "bce_loss", "binary_metrics", "make_predict", "embeddings", "switch_objective", "prepare_training",
           "array_batches", "fit", "train_switch",
           "save_switch", "restore_switch"]
