"""The toy world: its designed per-class modality reliability, measured with simple classifiers;
determinism; and a tiny world written as mp4 + CSV and converted by the VGGSound converter."""
import collections
import csv
import dataclasses
import hashlib
import json

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines import audioset, tfrecord, vggsound
from data_pipelines import toy_world as tw

SEEN = [i for i, c in enumerate(tw.CLASSES) if not c.unseen]


def test_design_table_is_consistent():
    names = [c.name for c in tw.CLASSES]
    assert len(set(names)) == len(names) == 20 and len(SEEN) == 16
    hard = 0.5 + np.log(tw.HARD_RATIO) / (4 * tw.HARD_SPREAD)
    assert 0.65 < hard < 0.8
    table = tw.design_table()
    groups = collections.Counter(row["designed_group"] for row in table if not row["unseen"])
    # Shaped like the paper: the visual model wins most classes, mostly where the audio model lacks a
    # mapping it could learn from its own input; a minority are audio's; some are clear in both.
    assert groups == {"visual wins, audio unlearned": 6, "visual wins, audio limit": 2,
                      "audio wins, visual limit": 6, "both clear": 2}
    assert {row["designed_group"] for row in table if row["unseen"]} == {"visual wins, audio unlearned",
                                                                        "audio wins, visual limit"}
    for row in table:
        weak = {"visual wins": "audio", "audio wins": "visual"}.get(row["group"])
        assert weak is not None or row["group"] == "both clear"
        for modality in ("audio", "visual"):
            partner = row[f"{modality}_partner"]
            scrambled = row[f"{modality}_pretrain_scrambled_with"]
            if modality == weak and row["designed_group"].endswith("limit"):
                # hard but possible: one parameter differs, with overlapping jitter
                assert partner is not None and tw.CLASSES[names.index(partner)].unseen == row["unseen"]
                assert table[names.index(partner)][f"{modality}_partner"] == row["class"]
                assert np.isclose(max(row[f"{modality}_partner_ratio"], 1 / row[f"{modality}_partner_ratio"]),
                                  tw.HARD_RATIO, rtol=1e-3)
                assert np.isclose(row[f"{modality}_pair_bayes_accuracy"], hard, atol=1e-3)
                assert "overlap" in row[f"{modality}_differs"] and not scrambled
            elif modality == weak:  # unlearned: the sound is clear, the pretraining labels are scrambled
                assert partner is None and row[f"{modality}_pair_bayes_accuracy"] == 1.0
                assert scrambled and all(table[names.index(c)]["designed_group"] == row["designed_group"]
                                         and table[names.index(c)]["unseen"] == row["unseen"] for c in scrambled)
            else:
                assert partner is None and row[f"{modality}_pair_bayes_accuracy"] == 1.0 and not scrambled
    # The scrambled groups are disjoint and their classes' sounds are different generators.
    members = [c for group in tw.PRETRAIN_SCRAMBLED["audio"] for c in group]
    assert len(members) == len(set(members)) == 8 and not tw.PRETRAIN_SCRAMBLED["visual"]
    for group in tw.PRETRAIN_SCRAMBLED["audio"]:
        sounds = [tw.CLASSES[names.index(c)].sound for c in group]
        assert len({(s.family, s.params) for s in sounds}) == len(group)
    police, ambulance = tw.CLASSES[names.index("police car (siren)")], tw.CLASSES[names.index("ambulance siren")]
    assert police.sound.family == ambulance.sound.family and police.sound.params[2:] == ambulance.sound.params[2:]
    assert police.look.shape != ambulance.look.shape
    violin, cello = tw.CLASSES[names.index("playing violin, fiddle")], tw.CLASSES[names.index("playing cello")]
    assert dataclasses.replace(violin.look, scale=cello.look.scale) == cello.look
    assert violin.sound != cello.sound
    assert tw.pair_bayes_accuracy(None, 0.2) == 1.0 and tw.pair_bayes_accuracy(2.0, 0.2) == 1.0
    assert tw.pair_bayes_accuracy(1.0, 0.0) == 0.5
    # Identical signatures would be found and rated as a coin flip (the old, impossible design).
    same = [dataclasses.replace(c, sound=tw.CLASSES[1].sound) if c.name == "chainsaw" else c for c in tw.CLASSES]
    row = tw.design_table(same)[0]
    assert row["audio_partner"] == "lawn mowing" and row["audio_pair_bayes_accuracy"] == 0.5


def _audio_features(audio):
    """Log power in 16 Hz bins to 530 Hz and 250 Hz bands to 7.5 kHz (mean, std over time) +
    the spectrum of the loudness envelope (rhythm)."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, 1024)[::512]
    power = np.abs(np.fft.rfft(frames * np.hanning(1024), axis=-1)) ** 2
    bands = np.concatenate([np.log(power[:, 2:34] + 1e-8),
                            np.log(power[:, 34:482].reshape(len(power), 28, 16).sum(-1) + 1e-8)], axis=1)
    envelope = np.log(power.sum(-1) + 1e-8)
    return np.concatenate([bands.mean(0), bands.std(0), np.abs(np.fft.rfft(envelope - envelope.mean()))[:12]])


def _visual_features(frames):
    """A 4x4 grey grid's mean, std and frame-to-frame change, a coarse colour histogram, and the
    object's size, height, width and movement: per 2x2-pooled frame, the largest connected patch
    of pixels far from the frame's median colour."""
    f = frames.astype(np.float32)
    pooled = (f[:, 0::2, 0::2] + f[:, 1::2, 0::2] + f[:, 0::2, 1::2] + f[:, 1::2, 1::2]) / 4
    grid = (pooled / 255).mean(-1).reshape(frames.shape[0], 4, 8, 4, 8).mean((2, 4))
    levels = (frames >> 6).reshape(-1, 3).astype(np.intp)
    hist = np.bincount(levels[:, 0] * 16 + levels[:, 1] * 4 + levels[:, 2], minlength=64) / len(levels)
    objects = []  # (area, height, width, centre y, centre x) of each frame's largest patch
    for mask in np.abs(pooled - np.median(pooled, axis=(1, 2), keepdims=True)).sum(-1) > 45:
        labels, count = ndimage.label(mask)
        if count == 0:
            objects.append((0, 0, 0, 16, 16))
            continue
        ys, xs = np.nonzero(labels == 1 + np.argmax(np.bincount(labels.ravel())[1:]))
        objects.append((len(ys), np.ptp(ys) + 1, np.ptp(xs) + 1, ys.mean(), xs.mean()))
    area, height, width, cy, cx = np.array(objects, np.float64).T
    shape = [np.sqrt(np.median(area)) / 8, np.log1p(np.median(height)), np.log1p(np.median(width)),
             np.std(cy) / 8, np.std(cx) / 8, np.std(np.sqrt(area)) / 8]
    return np.concatenate([grid.mean(0).ravel(), grid.std(0).ravel(), np.abs(np.diff(grid, axis=0)).mean(0).ravel(),
                           10 * np.sqrt(hist), shape])


def _centroid_distances(train, test, classes):
    """[test rows, classes] squared distances to the class means, in features standardised by the
    pooled within-class std (a nearest-centroid classifier picks the smallest)."""
    x, y = np.stack([f for _, f in train]), np.array([c for c, _ in train])
    sd = np.sqrt(np.mean([x[y == c].var(0) for c in classes], axis=0)) + 1e-6
    centroids = np.stack([x[y == c].mean(0) for c in classes]) / sd
    xt = np.stack([f for _, f in test]) / sd
    return ((xt[:, None] - centroids[None]) ** 2).sum(-1)


def measure_reliability(fit: int = 16, measure: int = 32) -> dict:
    """Nearest-centroid accuracies per modality, fitted on `fit` clips of each class (seen: train,
    unseen: pretrain) and measured on `measure` others (seen: test, unseen: unseen):
    {modality: {"clear": accuracy on the classes without an alike partner in that modality,
                "pairs": {(a, b): (accuracy choosing between a and b, share of a's and b's
                                   clips classified as a or b among all classes)}}}."""
    config = tw.WorldConfig()
    classes = list(range(len(tw.CLASSES)))
    clips = {"fit": [], "eval": []}
    for c, toy in enumerate(tw.CLASSES):
        for role, split, count in (("fit", "pretrain" if toy.unseen else "train", fit),
                                   ("eval", "unseen" if toy.unseen else "test", measure)):
            for k in range(count):
                frames, audio = tw.render_clip(c, tw.clip_rng(config, c, split, k), config)
                clips[role].append((c, _audio_features(audio), _visual_features(frames)))
    truth = np.array([c for c, _, _ in clips["eval"]])
    names, table = [c.name for c in tw.CLASSES], tw.design_table()
    pairs = sorted({tuple(sorted((i, names.index(r[f"{m}_partner"])))) for i, r in enumerate(table)
                    for m in ("audio", "visual") if r[f"{m}_partner"]})
    result = {}
    for modality, index in (("audio", 1), ("visual", 2)):
        distances = _centroid_distances([(c[0], c[index]) for c in clips["fit"]],
                                        [(c[0], c[index]) for c in clips["eval"]], classes)
        predicted = np.argmin(distances, axis=1)
        alike = np.array([table[c][f"{modality}_partner"] is not None for c in truth])
        result[modality] = {"clear": float((predicted == truth)[~alike].mean()), "pairs": {}}
        # Among the classes of each scrambled group: is the sound enough to tell which it is?
        hits = []
        for group in tw.PRETRAIN_SCRAMBLED[modality]:
            index = [names.index(c) for c in group]
            rows = np.isin(truth, index)
            choice = np.asarray(index)[np.argmin(distances[rows][:, index], axis=1)]
            hits.append(choice == truth[rows])
        result[modality]["scrambled"] = float(np.concatenate(hits).mean()) if hits else None
        for a, b in pairs:
            rows = np.isin(truth, (a, b))
            choice = np.where(distances[rows, a] <= distances[rows, b], a, b)
            result[modality]["pairs"][(names[a], names[b])] = (float((choice == truth[rows]).mean()),
                                                               float(np.isin(predicted[rows], (a, b)).mean()))
    return result


def test_designed_reliability_shows_in_measured_accuracy():
    """Per modality, with a nearest-centroid classifier: the two classes of a hard pair are told
    apart better than chance but well below the other modality (the design's Bayes bound is 0.73),
    and the classifier's errors on them go to the partner; every other class is clear, the
    classes scrambled in the audio model's pretraining included (their sounds hold the answer)."""
    measured = measure_reliability()
    names, table = [c.name for c in tw.CLASSES], tw.design_table()
    hard = []
    for modality, other in (("audio", "visual"), ("visual", "audio")):
        assert measured[modality]["clear"] >= 0.9, (modality, measured[modality]["clear"])
        for (a, b), (accuracy, in_pair) in measured[modality]["pairs"].items():
            if table[names.index(a)][f"{modality}_partner"] == b:  # hard in this modality
                hard.append(accuracy)
                # 64 clips a pair: one pair's estimate may stray ~2.5 sd (0.13) from the bound; the mean below may not
                assert 0.52 < accuracy < 0.92, (modality, a, b, accuracy)
                assert in_pair >= 0.85, (modality, a, b, in_pair)  # the errors go to the partner
                assert accuracy < measured[other]["pairs"][a, b][0] - 0.05, (modality, a, b)
            else:
                assert accuracy >= 0.95, (modality, a, b, accuracy)
    assert len(hard) == 5 and 0.55 < np.mean(hard) < 0.8, hard  # the Bayes bound: 0.73
    assert measured["audio"]["scrambled"] >= 0.95, measured["audio"]["scrambled"]


def test_clips_are_deterministic():
    config = tw.WorldConfig()
    a = tw.render_clip(4, tw.clip_rng(config, 4, "train", 3), config)
    b = tw.render_clip(4, tw.clip_rng(config, 4, "train", 3), config)
    c = tw.render_clip(4, tw.clip_rng(config, 4, "train", 4), config)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert a[0].shape == (16, 64, 64, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (32000,) and np.abs(a[1]).max() <= 0.3 + 1e-6


def test_unseen_classes_are_in_pretrain_and_unseen_only():
    """"Unseen" = never in distillation (train/analysis/test); the warm-started models know them."""
    config = tw.WorldConfig()
    plan = tw.clip_plan(config)
    assert len({ytid for ytid, _, _, _ in plan}) == len(plan) == 16 * (16 + 32 + 24 + 40) + 4 * (16 + 40)
    for c, toy in enumerate(tw.CLASSES):
        counts = collections.Counter(split for _, split, index, _ in plan if index == c)
        expected = {"pretrain": 16, "unseen": 40} if toy.unseen else dict(config.per_class)
        assert counts == expected, (toy.name, counts)
    no_pretrain = dataclasses.replace(config, per_class=(("train", 2),))
    assert {(s, tw.CLASSES[c].unseen) for _, s, c, _ in tw.clip_plan(no_pretrain)} == {("train", False),
                                                                                       ("unseen", True)}
    # A class's pretrain and unseen clips are different clips.
    a = tw.render_clip(19, tw.clip_rng(config, 19, "pretrain", 0), config)
    b = tw.render_clip(19, tw.clip_rng(config, 19, "unseen", 0), config)
    assert not np.array_equal(a[1], b[1])


TINY = tw.WorldConfig(per_class=(("pretrain", 1), ("train", 1), ("analysis", 1), ("test", 1)), unseen_per_class=1)


def test_tiny_world_goes_through_the_vggsound_and_audioset_converters(tmp_path):
    csv_path = tw.generate(tmp_path / "world", TINY, workers=1)
    rows = vggsound.read_csv(csv_path)
    assert len(rows) == 16 * 4 + 4
    assert {r.split for r in rows} == {"pretrain", "train", "analysis", "test"}
    unseen = {c.name for c in tw.CLASSES if c.unseen}
    # Unseen classes: in the AudioSet-format files and (as many as the seen ones) in "pretrain", in no
    # distillation split.
    audioset_dir = tmp_path / "world" / "audioset"
    segments = audioset.read_segments_csv(audioset_dir / "eval_segments.csv")
    ontology = audioset.load_ontology(audioset_dir / "ontology.json")
    keep = audioset.read_keep_list(audioset_dir / "keep.tsv", ontology)
    assert sorted(keep.values()) == sorted(unseen) and len(ontology) == 20
    assert [(ytid, start, end, [ontology[m] for m in mids]) for ytid, start, end, mids in segments] == [
        (f"toy{i:02d}-unseen-0000", 0.0, 2.0, [c.name]) for i, c in enumerate(tw.CLASSES) if c.unseen]
    assert sorted(r.label for r in rows if r.split == "pretrain") == sorted(c.name for c in tw.CLASSES)
    for split in ("train", "analysis", "test"):
        assert sorted(r.label for r in rows if r.split == split) == sorted(c.name for c in tw.CLASSES if not c.unseen)
    with open(csv_path, newline="") as f:
        assert next(csv.reader(f)) == ["toy00-pretrain-0000", "0", "chainsaw", "pretrain"]
    design = json.loads((tmp_path / "world" / "design.json").read_text())
    assert design["config"] == json.loads(json.dumps(dataclasses.asdict(TINY)))
    assert [r["class"] for r in design["classes"]] == [c.name for c in tw.CLASSES]
    assert design["hard_pairs"]["varies"]["audio"] == {"sweep": ["from Hz", "to Hz"]}
    assert design["pretrain_scrambled"]["audio"] == [list(g) for g in tw.PRETRAIN_SCRAMBLED["audio"]]

    manifest = vggsound.main(["--csv", csv_path, "--video-dir", str(tmp_path / "world" / "videos"),
                              "--out", str(tmp_path / "records"), "--name", "toy_world", "--analysis-size", "0",
                              "--fps", "4", "--max-seconds", "2", "--workers", "1", "--no-progress"])
    assert manifest["skipped"] == []
    assert {s: e["num_examples"] for s, e in manifest["splits"].items()} == {
        "analysis": 16, "pretrain": 20, "test": 16, "train": 16}
    assert manifest["classes"] == sorted(c.name for c in tw.CLASSES)
    assert manifest["splits"]["train"]["class_counts"] == {c.name: 1 for c in tw.CLASSES if not c.unseen}
    unseen_manifest = audioset.main([
        "--csv", str(audioset_dir / "eval_segments.csv"), "--ontology", str(audioset_dir / "ontology.json"),
        "--keep", str(audioset_dir / "keep.tsv"), "--video-dir", str(tmp_path / "world" / "videos"),
        "--out", str(tmp_path / "records"), "--name", "toy_world_unseen", "--fps", "4", "--max-seconds", "2",
        "--workers", "1", "--no-progress"])
    assert unseen_manifest["skipped"] == [] and unseen_manifest["classes"] == sorted(unseen)
    assert unseen_manifest["splits"]["eval"]["class_counts"] == {name: 1 for name in unseen}
    path = tmp_path / "records" / unseen_manifest["splits"]["eval"]["files"][0]
    clip = tfrecord.example_to_clip(next(tfrecord.iter_records(path)))
    assert clip.label_name in unseen and clip.clip_id == "toy16-unseen-0000_000000"
    assert len(clip.jpeg_frames) == 8 and clip.pcm16.shape == (32000,)

    # Seeded per clip: another world with other split sizes writes the same clips byte for byte.
    tw.generate(tmp_path / "again", dataclasses.replace(TINY, per_class=(("train", 1),)), workers=1)
    for name in ("toy00-train-0000_000000.mp4", "toy19-unseen-0000_000000.mp4"):
        files = [tmp_path / world / "videos" / name for world in ("world", "again")]
        digests = {hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
        assert len(digests) == 1


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="even size"):
        tw.WorldConfig(size=63)
    with pytest.raises(ValueError, match="distractor_prob"):
        tw.WorldConfig(distractor_prob=1.5)
