"""The VGGSound / AudioSet converters on real mp4 files made here with PyAV: decoded contents,
counts, the skip report (missing file, no audio, no video, corrupt, too short), the analysis
split, and resumption (finished shards are not rewritten)."""
import csv
import json
import os

import av
import numpy as np
import pytest

from data_pipelines import audioset, converter, media, tfrecord, vggsound

SR = 16000
FPS = 8
CLASSES = ["bird chirping, tweeting", "dog barking", "playing cello"]


def _audio(seconds: float, label: int) -> np.ndarray:
    t = np.arange(int(round(seconds * SR))) / SR
    return 0.4 * np.sin(2 * np.pi * ((200 + 150 * label) * t + 120 * t ** 2))  # a chirp: no periodic ambiguity


def _frames(seconds: float, height=48, width=64) -> np.ndarray:
    """Frame k is a flat grey of level 20 + 10 k, so a decoded frame tells which one it was."""
    n = int(round(seconds * FPS))
    return np.stack([np.full((height, width, 3), 20 + 10 * k, np.uint8) for k in range(n)])


def _write_audio_only(path, seconds: float) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        stream = c.add_stream("aac", rate=SR)
        stream.layout = "mono"
        pcm = (np.clip(_audio(seconds, 0), -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = SR
        c.mux(stream.encode(frame))
        c.mux(stream.encode(None))


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """A VGGSound-format CSV and clip directory: 3 classes x (4 train + 1 test) good clips and
    one test clip of each failure kind."""
    root = tmp_path_factory.mktemp("vggsound")
    videos = root / "videos"
    videos.mkdir()
    rows = []
    for label, name in enumerate(CLASSES):
        for i in range(5):
            ytid = f"y{label}x{i}"
            split = "train" if i < 4 else "test"
            media.write_mp4(videos / f"{ytid}_{30 + i:06d}.mp4", _frames(2.0), FPS, _audio(2.0, label),
                            video_bitrate=2_000_000)
            rows.append([ytid, 30 + i, name, split])
    media.write_mp4(videos / "noaudio_000000.mp4", _frames(2.0), FPS, None)
    _write_audio_only(videos / "novideo_000000.mp4", 2.0)
    (videos / "corrupt_000000.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    media.write_mp4(videos / "short_000000.mp4", _frames(0.5), FPS, _audio(0.5, 0))
    bad = {"missing": "missing file", "noaudio": "no audio stream", "novideo": "no video stream",
           "corrupt": "decode error", "short": "too short"}
    for ytid in bad:
        rows.append([ytid, 0, CLASSES[1], "test"])
    csv_path = root / "vggsound.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)  # the comma label is quoted, as in the official file
    return root, csv_path, videos, bad


def _convert(root, csv_path, videos, out="out", **flags):
    args = ["--csv", str(csv_path), "--video-dir", str(videos), "--out", str(root / out), "--fps", "2",
            "--max-short-side", "32", "--analysis-size", "3", "--clips-per-shard", "3", "--workers", "2",
            "--no-progress"]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return vggsound.main(args)


@pytest.fixture(scope="module")
def converted(vgg):
    root, csv_path, videos, bad = vgg
    manifest = _convert(root, csv_path, videos)
    return root / "out", manifest


def test_manifest_counts_and_skip_report(vgg, converted):
    _, _, _, bad = vgg
    out, manifest = converted
    assert manifest == json.loads((out / "vggsound.manifest.json").read_text())
    assert manifest["classes"] == CLASSES
    splits = manifest["splits"]
    assert {s: (e["num_examples"], e["num_skipped"]) for s, e in splits.items()} == {
        "analysis": (3, 0), "test": (3, 5), "train": (9, 0)}
    assert splits["train"]["files"] == [f"vggsound-train-{i:05d}-of-00003.tfrecord" for i in range(3)]
    assert splits["test"]["files"] == [f"vggsound-test-{i:05d}-of-00003.tfrecord" for i in range(3)]
    assert {s["clip_id"]: s["reason"] for s in manifest["skipped"]} == {f"{k}_000000": v for k, v in bad.items()}
    assert all(s["split"] == "test" and s["detail"] for s in manifest["skipped"])
    assert sorted(os.listdir(out)) == sorted(
        [f for e in splits.values() for f in e["files"]] + [f + ".json" for e in splits.values() for f in e["files"]]
        + ["vggsound.manifest.json"])  # no temporary files left


def test_records_hold_the_decoded_clips(converted):
    out, manifest = converted
    seen = {}
    for split, entry in manifest["splits"].items():
        source = tfrecord.TFRecordDataSource([str(out / f) for f in entry["files"]])
        for i in range(len(source)):
            clip = tfrecord.example_to_clip(source[i])
            seen[clip.clip_id] = clip
            assert clip.split == split
            assert manifest["classes"][clip.label_index] == clip.label_name
            label = CLASSES.index(clip.label_name)
            assert clip.clip_id.startswith(f"y{label}x")
            assert clip.start_sec == 30 + int(clip.clip_id[3])  # the CSV's start, for a trimmed file
            assert clip.sample_rate == SR and clip.fps == 2.0
            # Audio: all 2 s, aligned with what was written (AAC is lossy: small error only).
            assert clip.pcm16.shape == (2 * SR,)
            err = np.abs(clip.pcm16 / 32767 - _audio(2.0, label))
            assert err.mean() < 5e-3, err.mean()
            # Frames: 2 s at 2 fps = 4, the ones on screen at 0, 0.5, 1, 1.5 s (source frames 0, 4, 8, 12),
            # resized from 48x64 to short side 32.
            frames = [media.decode_jpeg(j) for j in clip.jpeg_frames]
            assert [f.shape for f in frames] == [(32, 43, 3)] * 4
            levels = [float(f.mean()) for f in frames]
            np.testing.assert_allclose(levels, [20 + 10 * k for k in (0, 4, 8, 12)], atol=3)
    assert len(seen) == 15


def test_analysis_split_is_stratified_seeded_and_kept_out_of_train(vgg, converted):
    _, csv_path, _, _ = vgg
    out, manifest = converted
    rows = vggsound.read_csv(csv_path)
    drawn = vggsound.draw_analysis_split(rows, 3, seed=0)
    analysis = sorted(r.clip_id for r in drawn if r.split == "analysis")
    assert analysis == sorted(r.clip_id for r in vggsound.draw_analysis_split(rows[::-1], 3, seed=0)
                              if r.split == "analysis")  # CSV order does not matter
    assert sorted(r.label for r in drawn if r.split == "analysis") == CLASSES  # one per class
    ids = {}
    for split in ("analysis", "train"):
        files = [str(out / f) for f in manifest["splits"][split]["files"]]
        ids[split] = {tfrecord.example_to_clip(r).clip_id for f in files for r in tfrecord.iter_records(f)}
    assert sorted(ids["analysis"]) == analysis
    assert not ids["analysis"] & ids["train"] and len(ids["train"]) == 9
    other_seeds = {tuple(sorted(r.clip_id for r in vggsound.draw_analysis_split(rows, 3, seed=s)
                                if r.split == "analysis")) for s in range(1, 6)}
    assert len(other_seeds | {tuple(analysis)}) > 1


def test_second_run_skips_finished_shards(vgg, converted):
    root, csv_path, videos, _ = vgg
    out, manifest = converted
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".tfrecord")}
    again = _convert(root, csv_path, videos)
    assert again == manifest
    assert {f: os.stat(out / f).st_mtime_ns for f in mtimes} == mtimes
    # A shard without its sidecar (interrupted before it finished) is the only one redone.
    redo = "vggsound-train-00001-of-00003.tfrecord"
    with open(out / redo, "rb") as f:
        content = f.read()
    os.remove(out / (redo + ".json"))
    assert _convert(root, csv_path, videos, workers=1) == manifest
    changed = [f for f in mtimes if os.stat(out / f).st_mtime_ns != mtimes[f]]
    assert changed == [redo]
    assert (out / redo).read_bytes() == content  # same clips, same bytes


def test_a_changed_plan_is_refused_not_mixed(vgg, converted):
    root, csv_path, videos, _ = vgg
    with pytest.raises(ValueError, match="written for a different list of clips"):
        _convert(root, csv_path, videos, seed=1)  # another analysis split: other shard contents


def test_class_list_option_skips_other_labels(vgg, tmp_path):
    root, csv_path, videos, _ = vgg
    classes = tmp_path / "classes.txt"
    classes.write_text("dog barking\nplaying cello\n")
    manifest = _convert(tmp_path, csv_path, videos, analysis_size=0, classes=classes, workers=1)
    assert manifest["classes"] == ["dog barking", "playing cello"]
    outside = [s for s in manifest["skipped"] if s["reason"] == converter.LABEL_NOT_IN_CLASSES]
    assert sorted(s["clip_id"] for s in outside) == [f"y0x{i}_{30 + i:06d}" for i in range(5)]
    assert manifest["splits"]["train"]["num_examples"] == 8


def test_csv_parsing(tmp_path):
    path = tmp_path / "v.csv"
    path.write_text("abc,5,cattle, bovinae cowbell,train\n\n'q',7,dog barking,test\n")
    rows = vggsound.read_csv(path)
    assert [(r.ytid, r.start, r.label, r.split, r.clip_id) for r in rows] == [
        ("abc", 5, "cattle, bovinae cowbell", "train", "abc_000005"), ("'q'", 7, "dog barking", "test", "'q'_000007")]
    path.write_text("abc,5,dog,train\nabc,five,dog,train\n")
    with pytest.raises(ValueError, match=r"v.csv:2: start seconds 'five' is not a number"):
        vggsound.read_csv(path)
    path.write_text("abc,5,dog,train\nabc,5,cat,test\n")
    with pytest.raises(ValueError, match=r"v.csv:2: clip abc_000005 already listed on line 1"):
        vggsound.read_csv(path)
    path.write_text("abc,5,train\n")
    with pytest.raises(ValueError, match=r"v.csv:1: expected 4 fields"):
        vggsound.read_csv(path)


def test_stratified_quota():
    assert vggsound.stratified_quota({"a": 10, "b": 5, "c": 1}, 4) == {"a": 3, "b": 1, "c": 0}
    assert vggsound.stratified_quota({"a": 3, "b": 3}, 3) == {"a": 2, "b": 1}  # tie: by name
    with pytest.raises(ValueError, match="analysis size 7"):
        vggsound.stratified_quota({"a": 3, "b": 3}, 7)


def test_decode_clip_cuts_untrimmed_files(vgg):
    _, _, videos, _ = vgg
    path = videos / "y2x0_000030.mp4"
    pcm, jpegs = media.decode_clip(path, start_sec=0.75, max_seconds=1.0, fps=4, max_short_side=448)
    np.testing.assert_allclose(pcm / 32767, _audio(2.0, 2)[12000:28000], atol=0.05)
    levels = [float(media.decode_jpeg(j).mean()) for j in jpegs]
    np.testing.assert_allclose(levels, [20 + 10 * k for k in (6, 8, 10, 12)], atol=3)  # 0.75, 1, 1.25, 1.5 s
    assert media.decode_jpeg(jpegs[0]).shape == (48, 64, 3)  # never upscaled
    with pytest.raises(ValueError, match="max_short_side must be >= 1"):
        converter.DecodeOptions(max_short_side=0)


def test_audioset_converter(vgg, tmp_path):
    _, _, videos, _ = vgg
    ontology = [{"id": "/m/bark", "name": "Bark"}, {"id": "/m/cello", "name": "Cello"},
                {"id": "/m/bird", "name": "Bird vocalization"}, {"id": "/m/speech", "name": "Speech"}]
    (tmp_path / "ontology.json").write_text(json.dumps(ontology))
    (tmp_path / "keep.tsv").write_text("Bark\tdog barking\n/m/cello\tplaying cello\nBird vocalization\n")
    (tmp_path / "eval_segments.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# num_ytids=4, num_segs=4, num_unique_labels=4, num_positive_labels=5\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        'y1x0, 30.000, 40.000, "/m/bark,/m/speech"\n'
        'y2x1, 31.000, 41.000, "/m/cello"\n'
        'y0x2, 32.000, 42.000, "/m/bird,/m/bark"\n'
        'zzz, 0.000, 10.000, "/m/speech"\n')
    manifest = audioset.main([
        "--csv", str(tmp_path / "eval_segments.csv"), "--ontology", str(tmp_path / "ontology.json"),
        "--keep", str(tmp_path / "keep.tsv"), "--video-dir", str(videos), "--out", str(tmp_path / "out"),
        "--workers", "1", "--no-progress", "--max-short-side", "32"])
    assert manifest["classes"] == ["Bird vocalization", "dog barking", "playing cello"]
    assert manifest["splits"]["eval"]["num_examples"] == 2 and manifest["splits"]["eval"]["num_skipped"] == 1
    assert manifest["skipped"] == [{"clip_id": "y0x2_000032", "split": "eval", "reason": audioset.SEVERAL_KEPT,
                                    "detail": "Bird vocalization, dog barking"}]
    assert manifest["source"]["segments_without_kept_class"] == 1
    files = [str(tmp_path / "out" / f) for f in manifest["splits"]["eval"]["files"]]
    clips = {c.clip_id: c for c in (tfrecord.example_to_clip(r) for f in files for r in tfrecord.iter_records(f))}
    assert {k: (c.label_name, c.start_sec) for k, c in clips.items()} == {
        "y1x0_000030": ("dog barking", 30.0), "y2x1_000031": ("playing cello", 31.0)}
    (tmp_path / "bad.tsv").write_text("Barking\n")
    with pytest.raises(ValueError, match=r"not AudioSet MIDs or ontology names: \['Barking'\]"):
        audioset.read_keep_list(tmp_path / "bad.tsv", audioset.load_ontology(tmp_path / "ontology.json"))


def _write_float_audio(path, audio: np.ndarray) -> None:
    """A clip whose audio is stored as 32-bit float PCM (Matroska), so it can hold NaN."""
    with av.open(str(path), "w", format="matroska") as c:
        video = c.add_stream("mpeg4", rate=FPS)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = c.add_stream("pcm_f32le", rate=SR)
        sound.layout = "mono"
        for frame in _frames(len(audio) / SR):
            c.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(video.encode(None))
        for i in range(0, len(audio), 1024):
            chunk = av.AudioFrame.from_ndarray(audio[None, i:i + 1024].astype(np.float32), format="flt", layout="mono")
            chunk.sample_rate, chunk.pts = SR, i
            c.mux(sound.encode(chunk))
        c.mux(sound.encode(None))


@pytest.mark.parametrize("workers", [1, 2])
def test_decoder_crash_nan_and_silent_audio_and_changed_options(vgg, tmp_path, monkeypatch, workers):
    """A decoder that segfaults on one clip costs that clip ("decoder crashed"), not the run, with
    one worker or several; NaN audio is refused with its reason; silent audio is written and
    flagged; a rerun with other decode options is refused, naming them."""
    _, _, videos, _ = vgg
    clips = tmp_path / "videos"
    clips.mkdir()
    for name in ("y0x0_000030", "y1x0_000030", "y2x0_000030"):
        os.symlink(videos / f"{name}.mp4", clips / f"{name}.mp4")
    media.write_mp4(clips / "silent_000000.mp4", _frames(2.0), FPS, np.zeros(2 * SR))
    nan_audio = _audio(2.0, 0)
    nan_audio[5000:5100] = np.nan
    _write_float_audio(clips / "nanaudio_000000.mp4", nan_audio)
    rows = [["y0x0", 30, CLASSES[0], "train"], ["y1x0", 30, CLASSES[1], "train"], ["silent", 0, CLASSES[1], "train"],
            ["nanaudio", 0, CLASSES[0], "train"], ["y2x0", 30, CLASSES[2], "train"]]
    csv_path = tmp_path / "clips.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    monkeypatch.setenv("DISTILL_JAX_CRASH_CLIP", "y1x0_000030")  # the decoding process segfaults on it
    manifest = _convert(tmp_path, csv_path, clips, analysis_size=0, workers=workers)
    reasons = {s["clip_id"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {"y1x0_000030": converter.DECODER_CRASHED, "nanaudio_000000": "non-finite audio"}
    assert manifest["splits"]["train"]["num_examples"] == 3 and manifest["splits"]["train"]["num_silent"] == 1
    assert manifest["silent"] == [{"clip_id": "silent_000000", "split": "train"}]
    files = [str(tmp_path / "out" / f) for f in manifest["splits"]["train"]["files"]]
    written = {tfrecord.example_to_clip(r).clip_id: tfrecord.example_to_clip(r) for f in files
               for r in tfrecord.iter_records(f)}
    assert sorted(written) == ["silent_000000", "y0x0_000030", "y2x0_000030"]
    assert not written["silent_000000"].pcm16.any() and written["y2x0_000030"].pcm16.std() > 1000
    with pytest.raises(ValueError, match=r"decoded with other options \(fps=2.0 there, 4.0 now\)"):
        _convert(tmp_path, csv_path, clips, analysis_size=0, workers=workers, fps=4)


def test_a_pool_that_breaks_before_a_clip_is_handed_over_costs_no_clip(vgg, tmp_path, monkeypatch):
    """A worker can die (on the clip before) while the next clips are being submitted: submit itself
    then raises. Those clips are decoded again one by one, like the ones in flight, and none is lost."""
    from concurrent.futures.process import BrokenProcessPool

    _, _, videos, _ = vgg
    clips = tmp_path / "videos"
    clips.mkdir()
    names = ("y0x0_000030", "y1x0_000030", "y2x0_000030")
    for name in names:
        os.symlink(videos / f"{name}.mp4", clips / f"{name}.mp4")
    csv_path = tmp_path / "clips.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([[n[:4], 30, CLASSES[i], "train"] for i, n in enumerate(names)])
    started = converter.worker_pool

    def broken_first(workers):
        pool = started(workers)
        if not getattr(broken_first, "done", False):
            broken_first.done = True
            with pytest.raises(BrokenProcessPool):
                pool.submit(os._exit, 1).result()  # the first pool is broken before any clip is submitted
        return pool

    monkeypatch.setattr(converter, "worker_pool", broken_first)
    manifest = _convert(tmp_path, csv_path, clips, analysis_size=0, workers=2)
    assert manifest["skipped"] == [] and manifest["splits"]["train"]["num_examples"] == 3
