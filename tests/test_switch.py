"""The heuristic switch: labels from hand-made prediction tables, the weighted BCE against
torch's, metrics by hand, training on a synthetic set whose label is a function of the
audio (full fine-tune, then a frozen-backbone head), predict with resampling, orbax
save/restore, bad input; side features (the switch variants) and the confidence features."""
import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from data_pipelines.audio_resample import resample
from distill_jax import sharding
from distill_jax.models.cnn14 import Cnn14Config
from distill_jax.train import switch as sw

TINY = Cnn14Config.preset("tiny")


def test_sample_labels_from_a_prediction_table():
    truth = np.array(list("ABCDAB"))
    teacher = np.array(list("ABXDXB"))  # right on clips 0, 1, 3, 5
    student = np.array(list("AXCXXX"))  # right on clips 0, 2
    t, s = sw.correct(teacher, truth), sw.correct(student, truth)
    np.testing.assert_array_equal(t, [1, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(sw.sample_labels(t, s), [0, 1, 0, 1, 0, 1])
    tc = [0.9, 0.8, 0.1, 0.7, 0.3, 0.4]
    sc = [0.95, 0.2, 0.8, 0.1, 0.3, 0.5]  # clip 4 ties: not "above"
    np.testing.assert_array_equal(sw.sample_labels(t, s, rule="confidence", teacher_confidence=tc,
                                                   student_confidence=sc), [0, 1, 0, 1, 0, 0])
    config = sw.SwitchConfig(backbone=TINY, sample_rule="confidence")
    np.testing.assert_array_equal(sw.make_labels(config, truth=truth, teacher_answers=teacher, student_answers=student,
                                                 teacher_confidence=tc, student_confidence=sc), [0, 1, 0, 1, 0, 0])
    with pytest.raises(ValueError, match="needs teacher_confidence and student_confidence"):
        sw.sample_labels(t, s, rule="confidence")
    with pytest.raises(ValueError, match="student_correct has 5 entries, expected 6"):
        sw.sample_labels(t, s[:5])
    with pytest.raises(ValueError, match=r"teacher_confidence has non-finite entries at clips \[2\]"):
        sw.sample_labels(t, s, rule="confidence", teacher_confidence=[0.9, 0.8, np.nan, 0.7, 0.3, 0.4],
                         student_confidence=sc)


def test_class_labels_with_a_margin():
    classes = ["dog"] * 3 + ["cat"] * 2 + ["car"] * 4
    teacher = [1, 1, 1, 1, 0, 1, 1, 0, 0]  # dog 3/3, cat 1/2, car 2/4
    student = [1, 0, 0, 0, 1, 1, 0, 0, 0]  # dog 1/3, cat 1/2, car 1/4
    labels, table = sw.class_labels(classes, teacher, student)
    np.testing.assert_array_equal(labels, [1, 1, 1, 0, 0, 1, 1, 1, 1])
    assert table["car"] == dict(teacher=0.5, student=0.25, clips=4, label=1)
    assert table["cat"]["label"] == 0  # equal accuracy is not "exceeds"
    labels, table = sw.class_labels(classes, teacher, student, margin=0.3)
    np.testing.assert_array_equal(labels, [1, 1, 1, 0, 0, 0, 0, 0, 0])  # car's +0.25 is under the margin
    config = sw.SwitchConfig(backbone=TINY, label_mode="class", class_margin=0.3)
    truth = np.arange(9)
    answers = lambda right: np.where(np.array(right) == 1, truth, -1)  # noqa: E731
    np.testing.assert_array_equal(sw.make_labels(config, truth=truth, teacher_answers=answers(teacher),
                                                 student_answers=answers(student), classes=classes), labels)
    with pytest.raises(ValueError, match=r"label_mode='class' needs each clip's class"):
        sw.make_labels(config, truth=truth, teacher_answers=truth, student_answers=truth)


def test_weighted_bce_equals_torch_and_metrics_by_hand():
    rng = np.random.RandomState(0)
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    logits = rng.randn(10).astype(np.float32) * 3
    weight = sw.imbalance_weight(labels)
    assert weight == 4.0  # 8 negatives / 2 positives
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weight))(torch.tensor(logits),
                                                                     torch.tensor(labels, dtype=torch.float32))
    assert abs(float(sw.bce_loss(logits, labels, weight)) - float(ref)) < 1e-6
    with pytest.raises(ValueError, match="labels are all negative .* nothing to learn"):
        sw.imbalance_weight(np.zeros(4))
    with pytest.raises(ValueError, match=r"labels must be 0 or 1, got values \[2\]"):
        sw.imbalance_weight([0, 1, 2])

    y = [1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.4, 0.05]
    m = sw.binary_metrics(y, p, threshold=0.5)  # tp 2, fn 1, fp 1, tn 4
    assert m["accuracy"] == 0.75 and m["precision"] == 2 / 3 and m["recall"] == 2 / 3
    assert abs(m["balanced_accuracy"] - (2 / 3 + 4 / 5) / 2) < 1e-12 and m["majority_baseline"] == 5 / 8
    m = sw.binary_metrics(y, p, threshold=0.65)  # tp 1, fn 2, fp 1, tn 4
    assert m["accuracy"] == 5 / 8 and m["precision"] == 0.5 and m["recall"] == 1 / 3
    assert sw.binary_metrics(y, np.zeros(8))["precision"] == 0.0  # nothing predicted positive
    with pytest.raises(ValueError, match=r"SwitchConfig.finetune='some'"):
        sw.SwitchConfig(finetune="some")
    with pytest.raises(ValueError, match="threshold must be in"):
        sw.SwitchConfig(threshold=1.0)


def synthetic(n, seed, sample_rate=16000, seconds=0.5):
    """Clips with a tone plus noise; label 1 (30 %) for a 2.5-3.5 kHz tone, 0 for 300-700 Hz."""
    rng = np.random.RandomState(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    y = (rng.rand(n) < 0.3).astype(np.int32)
    f = np.where(y == 1, rng.uniform(2500, 3500, n), rng.uniform(300, 700, n))
    x = 0.3 * np.sin(2 * np.pi * f[:, None] * t + rng.uniform(0, 2 * np.pi, (n, 1))) + 0.1 * rng.randn(n, t.size)
    return x.astype(np.float32), y


MARGIN = 0.2  # accuracy above the majority-class baseline that training must reach on held-out clips


def test_switch_learns_a_synthetic_rule_then_saves_and_restores(tmp_path):
    x, y = synthetic(96, seed=0)
    ex, ey = synthetic(64, seed=1)
    config = sw.SwitchConfig(backbone=TINY, finetune="full", epochs=6, batch_size=16, learning_rate=1e-3)
    switch, report = sw.train_switch(config, x, y, eval_waveforms=ex, eval_labels=ey)
    ev = report["eval"]
    print("full fine-tune:", report)
    assert report["pos_weight"] == pytest.approx((y == 0).sum() / (y == 1).sum())
    assert ev["accuracy"] >= ev["majority_baseline"] + MARGIN and ev["balanced_accuracy"] >= 0.8
    assert not np.allclose(np.asarray(switch.backbone.conv_block1.bn1.var[...]), 1.0)  # train-mode BN updated

    # Frozen backbone: only the head trains; the backbone's variables are untouched.
    backbone = switch.backbone
    before = {k: np.asarray(v).copy() for k, v in nnx.to_flat_state(nnx.state(backbone, nnx.Param))}
    head_config = sw.SwitchConfig(backbone=TINY, finetune="head", epochs=30, batch_size=16, learning_rate=1e-2)
    frozen, head_report = sw.train_switch(head_config, x, y, eval_waveforms=ex, eval_labels=ey, backbone=backbone)
    print("frozen backbone + head:", head_report)
    assert head_report["eval"]["accuracy"] >= head_report["eval"]["majority_baseline"] + MARGIN
    for k, v in nnx.to_flat_state(nnx.state(frozen.backbone, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(v), before[k])

    # Save / restore: the same probabilities.
    probs = sw.make_predict(frozen, batch_size=16)(ex)
    sw.save_switch(frozen, str(tmp_path / "switch"))
    restored = sw.restore_switch(str(tmp_path / "switch"))
    assert restored.config == head_config
    np.testing.assert_array_equal(sw.make_predict(restored, batch_size=16)(ex), probs)

    # predict resamples: 8 kHz input equals the same clips resampled to 16 kHz by hand.
    clips_8k = ex[:5, ::2].copy()
    np.testing.assert_allclose(sw.make_predict(frozen, batch_size=16, sample_rate=8000)(clips_8k),
                               sw.make_predict(frozen, batch_size=16)(resample(clips_8k, 8000, 16000)), atol=1e-6)

    bad = ex[:3].copy()
    bad[2, 100] = np.inf
    with pytest.raises(ValueError, match=r"1 non-finite samples \(NaN or inf\) in clips \[2\]"):
        sw.make_predict(frozen)(bad)
    with pytest.raises(ValueError, match="have 3000 samples"):
        sw.make_predict(frozen)(ex[:, :3000])
    with pytest.raises(FileNotFoundError, match="no switch_config.json"):
        sw.restore_switch(str(tmp_path))


def test_side_features_teach_the_switch_what_the_audio_cannot_and_are_kept_with_it(tmp_path):
    """The clips' audio is the same noise for both labels; one side feature (offset by 100 and
    scaled by 50, so only its standardisation makes it usable) carries the label: the audio-only
    switch stays near chance, the switch with side features learns the rule, and save / restore
    keeps the standardisation."""
    rng = np.random.RandomState(0)
    n, held_out = 96, 64
    waves = (0.1 * rng.randn(n + held_out, 8000)).astype(np.float32)
    y = (rng.rand(n + held_out) < 0.3).astype(np.int32)
    features = np.stack([100 + 50 * (y + 0.3 * rng.randn(y.size)), 100 + 50 * rng.randn(y.size),
                         rng.randn(y.size)], 1).astype(np.float32)
    config = sw.SwitchConfig(backbone=TINY, finetune="head", epochs=12, batch_size=16, learning_rate=3e-2)
    _, audio_only = sw.train_switch(config, waves[:n], y[:n], eval_waveforms=waves[n:], eval_labels=y[n:])
    with_features = dataclasses.replace(config, feature_dim=3)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        switch, _ = sw.fit(with_features, waves[:n], y[:n], mesh=mesh, features=features[:n])
    predict = sw.make_predict(switch, batch_size=16)
    learned = sw.binary_metrics(y[n:], predict(waves[n:], features[n:]))
    print("audio only:", audio_only["eval"], "with side features:", learned)
    assert audio_only["eval"]["balanced_accuracy"] < 0.65
    assert learned["accuracy"] >= learned["majority_baseline"] + MARGIN and learned["balanced_accuracy"] >= 0.9
    np.testing.assert_allclose(np.asarray(switch.feature_mean[...]), features[:n].mean(0), rtol=1e-5)

    sw.save_switch(switch, str(tmp_path / "switch"))
    restored = sw.restore_switch(str(tmp_path / "switch"))
    np.testing.assert_array_equal(sw.make_predict(restored, batch_size=16)(waves[n:], features[n:]),
                                  predict(waves[n:], features[n:]))
    with pytest.raises(ValueError, match=r"side features must be \[64, 3\]"):
        predict(waves[n:], features[n:, :2])
    with pytest.raises(ValueError, match="takes no side features"):
        sw.make_predict(sw.Switch(config, rngs=nnx.Rngs(0)))(waves[:2], features[:2])


def test_confidence_features_by_hand():
    from distill_jax.stages.switch import CONFIDENCE_FEATURES, confidence_features

    teacher = np.log([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    student = np.log([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
    entropy = lambda p: -sum(q * np.log(q) for q in p)  # noqa: E731
    expected = [[0.7, 0.5, entropy([0.7, 0.2, 0.1]), 0.5, 0.1, entropy([0.1, 0.5, 0.4]), 0.0],
                [1 / 3, 0.0, np.log(3), 0.6, 0.3, entropy([0.6, 0.3, 0.1]), 1.0]]
    got = confidence_features(teacher, student)
    assert got.shape == (2, len(CONFIDENCE_FEATURES))
    np.testing.assert_allclose(got, expected, atol=1e-6)
