"""data_pipelines.pipeline on real TFRecord files: every clip once per epoch, hosts disjoint and
covering, seeded shuffles, exact resume (in process, through orbax, and with worker processes),
the Qwen2-Audio transform plugged in, global jax.Arrays on the 8-device mesh, bad records."""
import dataclasses
import json
import pickle

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec

from data_pipelines import audio, media, tfrecord
from data_pipelines.pipeline import Pad, PadBatch, PipelineConfig, make_dataset, restore_iterator_state, \
    save_iterator_state
from data_pipelines.questions import QuestionMaker
from data_pipelines.transforms import Qwen2AudioTransform
from distill_jax import prompts, sharding
from distill_jax.toy_tokenizer import make_qwen2_tokenizer

NUM_CLIPS = 37
CLASSES = [f"class {i:02d}" for i in range(12)]
AUDIO_PAD = {"audio": Pad((2048, 4096), side="right", mask_key="audio_mask")}


def _pcm(i: int) -> np.ndarray:
    n = 1600 + 37 * i  # 0.1 s .. 0.18 s: varying lengths
    return (8000 * np.sin(2 * np.pi * (100 + 10 * i) * np.arange(n) / 16000)).astype(np.int16)


def _clip(i: int) -> tfrecord.Clip:
    frames = tuple(media.encode_jpeg(np.full((16, 16, 3), (5 * i + 60 * k) % 250, np.uint8)) for k in range(2))
    return tfrecord.Clip(clip_id=f"clip{i:03d}", start_sec=float(i), label_index=i % len(CLASSES),
                         label_name=CLASSES[i % len(CLASSES)], pcm16=_pcm(i), sample_rate=16000,
                         jpeg_frames=frames, fps=2.0, split="test")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    out = []
    for name, ids in (("a", range(0, 20)), ("b", range(20, NUM_CLIPS))):
        with tfrecord.TFRecordWriter(root / f"{name}.tfrecord") as writer:
            for i in ids:
                writer.write(tfrecord.clip_to_example(_clip(i)))
        out.append(str(root / f"{name}.tfrecord"))
    return out


def _config(**kw):
    defaults = dict(batch_size=8, decode_audio=False, decode_frames=False, read_threads=1)
    return PipelineConfig(**{**defaults, **kw})


def _batches(paths, config, *, host=(0, 1), class_names=CLASSES, **kw):
    it = iter(make_dataset(paths, class_names, config=config, process_index=host[0], process_count=host[1], **kw))
    try:
        return list(it)
    finally:
        it.close()


def _valid_ids(batches):
    return [cid for b in batches for cid, v in zip(b["clip_id"], b["valid"]) if v]


def test_eval_pass_yields_every_clip_once_with_its_contents(paths):
    config = _config(shuffle=False, drop_remainder=False, decode_audio=True, decode_frames=True)
    batches = _batches(paths, config, padding=AUDIO_PAD)
    assert len(batches) == 5 and all(len(b["clip_id"]) == 8 for b in batches)  # ceil(37 / 8), padded
    assert _valid_ids(batches) == [f"clip{i:03d}" for i in range(NUM_CLIPS)]
    assert sum(int(b["valid"].sum()) for b in batches) == NUM_CLIPS
    for b in batches:
        longest = max(len(_pcm(int(cid[4:]))) for cid in b["clip_id"])
        assert b["audio"].shape == (8, 2048 if longest <= 2048 else 4096)  # the smallest bucket that fits
        assert b["frames"].shape == (8, 2, 16, 16, 3)
        for row, cid in enumerate(b["clip_id"]):
            clip = _clip(int(cid[4:]))
            n = len(clip.pcm16)
            np.testing.assert_array_equal(b["audio"][row, :n], clip.pcm16 / np.float32(32768))
            assert not b["audio"][row, n:].any() and b["audio_mask"][row].sum() == n
            for k, jpeg in enumerate(clip.jpeg_frames):
                np.testing.assert_array_equal(b["frames"][row, k], media.decode_jpeg(jpeg))
            assert b["label"][row] == clip.label_index and b["label_name"][row] == clip.label_name
            question = QuestionMaker(CLASSES)(cid, clip.label_name)
            assert tuple(b["options"][row]) == question.options and b["answer"][row] == question.answer
            assert b["options"][row][b["answer"][row]] == clip.label_name
            assert b["question"][row] == question.text()


def test_two_hosts_get_disjoint_shards_covering_the_split(paths):
    # Evaluation: each host ceil(37 / 2) = 19 slots, padded to 5 batches of 4: same step count.
    config = _config(shuffle=True, drop_remainder=False)
    hosts = [_batches(paths, config, host=(h, 2)) for h in range(2)]
    assert [len(h) for h in hosts] == [5, 5] and all(len(b["clip_id"]) == 4 for h in hosts for b in h)
    ids = [_valid_ids(h) for h in hosts]
    assert len(ids[0]) + len(ids[1]) == NUM_CLIPS and sorted(ids[0] + ids[1]) == [f"clip{i:03d}" for i in range(37)]
    # Training: 2 epochs, 18 slots a host (one clip a epoch left out), disjoint within each epoch.
    config = _config(shuffle=True, num_epochs=2, batch_size=4)
    hosts = [_batches(paths, config, host=(h, 2)) for h in range(2)]
    assert [len(h) for h in hosts] == [18, 18]  # 2 epochs x 18 slots in batches of 2 per host
    for epoch in range(2):
        per_host = [set(_valid_ids(h[epoch * 9:(epoch + 1) * 9])) for h in hosts]
        assert len(per_host[0]) == len(per_host[1]) == 18 and not per_host[0] & per_host[1]
    first, second = (_valid_ids(hosts[0][e * 9:(e + 1) * 9]) for e in range(2))
    assert first != second  # each epoch has its own permutation


def test_shuffle_is_global_and_seeded(paths):
    order = _valid_ids(_batches(paths, _config(shuffle=True, drop_remainder=False)))
    assert sorted(order) == [f"clip{i:03d}" for i in range(NUM_CLIPS)]
    assert order != sorted(order)
    assert order == _valid_ids(_batches(paths, _config(shuffle=True, drop_remainder=False)))
    assert order != _valid_ids(_batches(paths, _config(shuffle=True, drop_remainder=False, seed=1)))
    files = {int(cid[4:]) >= 20 for cid in order[:8]}
    assert files == {False, True}  # the first batch already mixes both files


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in g:
            np.testing.assert_array_equal(g[key], w[key])


def test_resume_from_mid_epoch_state_yields_exactly_the_remaining_batches(paths, tmp_path):
    config = _config(shuffle=True, num_epochs=2, batch_size=4, decode_audio=True)
    ds = make_dataset(paths, CLASSES, config=config, padding=AUDIO_PAD, process_index=0, process_count=1)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    save_iterator_state(tmp_path / "data_state", it)
    for _ in range(6):  # past the end of epoch 1 (9 batches)
        next(it)
    state_epoch2 = it.get_state()
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it),
                                             step=ocp.args.JsonSave({"step": 11})))
    manager.wait_until_finished()
    rest_after_11 = list(it)
    assert len(rest_after_11) == 18 - 11

    uninterrupted = list(iter(ds))
    assert len(uninterrupted) == 18
    _assert_same_batches(rest_after_11, uninterrupted[11:])

    fresh = iter(make_dataset(paths, CLASSES, config=config, padding=AUDIO_PAD, process_index=0, process_count=1))
    fresh.set_state(state)
    _assert_same_batches(list(fresh), uninterrupted[5:])
    fresh = iter(ds)
    fresh.set_state(state_epoch2)
    _assert_same_batches(list(fresh), uninterrupted[11:])
    fresh = restore_iterator_state(tmp_path / "data_state", iter(ds))
    _assert_same_batches(list(fresh), uninterrupted[5:])
    fresh = iter(ds)
    restored = manager.restore(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh),
                                                           step=ocp.args.JsonRestore()))
    assert restored["step"] == {"step": 11}
    _assert_same_batches(list(fresh), uninterrupted[11:])
    manager.close()


def test_worker_processes_give_the_same_batches_and_resume(paths, tmp_path):
    config = _config(shuffle=True, num_epochs=1, batch_size=4, decode_audio=True, worker_count=2)
    ds = make_dataset(paths, CLASSES, config=config, padding=AUDIO_PAD, process_index=0, process_count=1)
    it = iter(ds)
    head = [next(it) for _ in range(3)]
    save_iterator_state(tmp_path / "state", it)
    rest = list(it)
    it.close()
    fresh = restore_iterator_state(tmp_path / "state", iter(ds))
    resumed = list(fresh)
    fresh.close()
    _assert_same_batches(resumed, rest)
    # Batch i does not depend on where it was made: the in-process pipeline gives the same ones.
    in_process = _batches(paths, dataclasses.replace(config, worker_count=0), padding=AUDIO_PAD)
    assert len(in_process) == 9  # 37 clips, batches of 4, remainder dropped
    _assert_same_batches(head + rest, in_process)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_qwen2_tokenizer(tmp_path_factory.mktemp("tok"))


def test_qwen2_audio_transform_plugs_in(paths, tokenizer_dir):
    transform = Qwen2AudioTransform(tokenizer_dir, max_seconds=1.0)
    shipped = pickle.loads(pickle.dumps(transform))  # as Grain ships it to a worker: no tokenizer inside
    assert shipped._tokenizer is None
    padding = shipped.padding(buckets=(200, 400, 800))
    config = _config(shuffle=False, drop_remainder=False, decode_audio=True)
    batches = _batches(paths, config, transform=shipped, padding=padding)
    tok = prompts.load_tokenizer(tokenizer_dir)
    assert len(batches) == 5 and _valid_ids(batches)[:3] == ["clip000", "clip001", "clip002"]
    assert set(batches[0]) == {"input_features", "feature_attention_mask", "input_ids", "attention_mask",
                               "clip_id", "index", "valid", "label", "answer", "data_error"}
    for b in batches:
        np.testing.assert_array_equal(b["index"][b["valid"] == 1],
                                      [int(c[4:]) for c, v in zip(b["clip_id"], b["valid"]) if v])
        width = b["input_ids"].shape[1]
        assert width in (200, 400, 800) and b["input_features"].shape == (8, 128, 104)  # 1 s clips' window
        for row, cid in enumerate(b["clip_id"]):
            clip = _clip(int(cid[4:]))
            features, mask = audio.log_mel_features(clip.pcm16 / np.float32(32768))  # the 30 s chunk
            np.testing.assert_array_equal(b["input_features"][row], features[:, :104])
            np.testing.assert_array_equal(b["feature_attention_mask"][row], mask[:104])
            assert mask[104:].sum() == 0
            question = QuestionMaker(CLASSES)(cid, clip.label_name)
            ids = prompts.encode_qwen2_audio(tok, question.text(), audio.num_audio_tokens(int(mask.sum())))
            assert width == min(w for w in (200, 400, 800) if w >= max(len(ids), 1)) or len(ids) < width
            np.testing.assert_array_equal(b["input_ids"][row, width - len(ids):], ids)  # left-padded
            assert (b["input_ids"][row, :width - len(ids)] == tok.pad_token_id).all()
            np.testing.assert_array_equal(b["attention_mask"][row], np.arange(width) >= width - len(ids))
            assert b["answer"][row] == question.answer


def test_hosts_agree_on_each_batchs_lengths(paths, monkeypatch):
    """On several hosts each batch is padded to the largest lengths any host chose (`AgreeOnShapes`):
    what PadBatch makes of the same rows with those lengths, masks included; a prompt that follows a
    video layout takes the length the agreed layout implies."""
    from jax.experimental import multihost_utils

    from data_pipelines.pipeline import AgreeOnShapes, grow, padded_shape

    rows = [{"clip_id": f"c{i}", "ids": np.arange(3 + i), "video": np.ones((1 + i, 4 + 4 * i, 2), np.float32)}
            for i in range(2)]
    padding = {"video": Pad((1, 2, 3), inner=True, inner_buckets=(4, 8, 16)),
               "ids": Pad(value=-1, side="left", mask_key="mask", follows="video", base=5, per=4, multiple=1)}
    mine = PadBatch(padding)(rows)
    assert padded_shape(mine, "video", padding["video"]) == (2, 8) and mine["ids"].shape == (2, 9)  # 5 + 2 * 8 / 4
    other = {"video": (3, 4)}  # another host's batch chose 3 temporal patches of 4 patches: agreed (3, 8)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.stack([x, np.asarray([n for k in sorted(other) for n in other[k]], np.int32)]))
    agreed = next(iter(AgreeOnShapes(grain.MapDataset.source([mine]).to_iter_dataset(), padding)))
    expected = PadBatch({"video": Pad((3,), inner=True, inner_buckets=(8,)),
                         "ids": Pad((11,), value=-1, side="left", mask_key="mask")})(rows)  # 5 + 3 * 8 / 4
    assert set(agreed) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(agreed[key], expected[key])
    with pytest.raises(ValueError, match="cannot shrink"):
        grow(mine, padding, {"video": (1, 8), "ids": (9,)})


def test_prompts_are_padded_per_batch(paths, tokenizer_dir):
    """Each batch's prompts go to the smallest bucket that holds its longest (never one length for a
    split from its first clip), and a prompt over every bucket is an error naming the clip."""
    transform = Qwen2AudioTransform(tokenizer_dir, max_seconds=1.0)
    config = _config(shuffle=False, drop_remainder=False, decode_audio=True)
    wide = _batches(paths, config, transform=transform, padding=transform.padding((800,)))
    longest = [int(b["attention_mask"].sum(1).max()) for b in wide]
    assert len(set(longest)) > 1, longest  # the batches' longest prompts differ (clips of different lengths)
    buckets = tuple(sorted(set(longest))) + (800,)
    batches = _batches(paths, config, transform=transform, padding=transform.padding(buckets))
    assert [b["input_ids"].shape[1] for b in batches] == longest  # each batch at its own bucket
    for b, w in zip(batches, wide):
        np.testing.assert_array_equal(b["input_ids"], w["input_ids"][:, 800 - b["input_ids"].shape[1]:])
    with pytest.raises(ValueError, match=r"clip clip\d+: 'input_ids' has length \d+, over the largest bucket 20"):
        _batches(paths, _config(shuffle=False, drop_remainder=False, decode_audio=True), transform=transform,
                 padding=transform.padding((20,)))


def test_the_trainer_places_batches_on_the_mesh(paths):
    from distill_jax.train.loop import local_rows, place

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    batch = _batches(paths, _config(shuffle=False, drop_remainder=False, decode_audio=True), padding=AUDIO_PAD)[0]
    placed = place(batch, mesh)
    for key in ("audio", "audio_mask", "label", "answer", "valid"):
        assert isinstance(placed[key], jax.Array) and placed[key].shape == batch[key].shape
        assert placed[key].sharding.spec == PartitionSpec(("data", "fsdp"))
        assert len(placed[key].addressable_shards) == 8
        assert placed[key].addressable_shards[0].data.shape[0] == 1
        np.testing.assert_array_equal(np.asarray(placed[key]), batch[key])
        np.testing.assert_array_equal(local_rows(placed[key]), batch[key])
    assert "clip_id" not in placed  # strings stay on the host
    with pytest.raises(ValueError, match="'audio' .* cannot be split over the mesh's batch axes"):
        place({"audio": batch["audio"][:6]}, mesh)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def test_corrupt_record_raises_or_is_skipped(paths, tmp_path):
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(open(paths[1], "rb").read())
    _flip(bad, 100)  # inside the first record's data
    config = _config(shuffle=False, drop_remainder=False)
    with pytest.raises(tfrecord.TFRecordError, match="bad.tfrecord: record at byte offset 0: data CRC mismatch"):
        _batches([paths[0], str(bad)], config)
    skipping = _config(shuffle=False, drop_remainder=False, on_error="skip")
    reported = []
    batches = _batches([paths[0], str(bad)], skipping, on_data_error=reported.append)
    assert len(batches) == 5  # the same steps as without the bad record
    assert _valid_ids(batches) == [f"clip{i:03d}" for i in range(NUM_CLIPS) if i != 20]
    row = list(batches[2]["clip_id"]).index("clip016")  # the batch of records 16..23 holds the skip
    # clip 20's row: the next readable record stands in, invalid, with the error
    assert batches[2]["valid"][row:row + 5].tolist() == [1, 1, 1, 1, 0] and batches[2]["clip_id"][row + 4] == "clip021"
    assert json.loads(batches[2]["data_error"][row + 4])["reason"].startswith("data CRC mismatch")
    assert [e["offset"] for e in reported] == [0] and reported[0]["path"] == str(bad)  # reported once, named


class _RefusesSome:
    """A model transform that cannot take clips 20 and 21 (as Qwen2-VL refuses a frame too small)."""

    def __call__(self, example):
        if example["clip_id"] in ("clip020", "clip021"):
            raise ValueError(f"clip {example['clip_id']}: too small for a patch")
        return {"x": np.zeros(2, np.float32)}


def test_a_clip_the_model_refuses_raises_or_is_skipped(paths):
    """on_error="skip": a clip the transform refuses is a bad record; the next clip the model takes
    stands in, invalid, with the reason (clip 21, refused too, is passed over for clip 22)."""
    with pytest.raises(ValueError, match="clip clip020: too small for a patch"):
        _batches(paths, _config(shuffle=False, drop_remainder=False), transform=_RefusesSome())
    batches = _batches(paths, _config(shuffle=False, drop_remainder=False, on_error="skip"), transform=_RefusesSome())
    assert _valid_ids(batches) == [f"clip{i:03d}" for i in range(NUM_CLIPS) if i not in (20, 21)]
    row = list(batches[2]["clip_id"]).index("clip016")
    assert batches[2]["valid"][row:row + 6].tolist() == [1, 1, 1, 1, 0, 0]
    assert list(batches[2]["clip_id"][row + 4:row + 6]) == ["clip022", "clip022"]
    reasons = [json.loads(e)["reason"] for e in batches[2]["data_error"][row + 4:row + 6]]
    assert reasons == ["model input: clip clip020: too small for a patch", "model input: clip clip021: too small for a patch"]


def test_bad_inputs_are_named(paths):
    wrong = ["other"] + CLASSES[1:]  # a class list that is not the one the records were written with
    with pytest.raises(tfrecord.TFRecordError, match=r"a.tfrecord: record at byte offset 0 \(clip clip000\): label "
                                                     r"'class 00' \(index 0\) does not match the class list"):
        _batches(paths, _config(shuffle=False), question_maker=QuestionMaker(CLASSES), class_names=wrong)
    with pytest.raises(ValueError, match="batch_size 8 is not divisible by the 3 hosts"):
        make_dataset(paths, CLASSES, config=_config(), process_index=0, process_count=3)
    with pytest.raises(ValueError, match="num_epochs must be >= 1"):
        _config(num_epochs=0)
    pad = PadBatch({"input_ids": Pad((4, 8), value=-1, side="left", mask_key="mask")})
    out = pad([{"clip_id": "a", "input_ids": np.arange(3)}, {"clip_id": "b", "input_ids": np.arange(5)}])
    np.testing.assert_array_equal(out["input_ids"], [[-1] * 5 + [0, 1, 2], [-1] * 3 + [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(out["mask"].sum(1), [3, 5])
    with pytest.raises(ValueError, match="clip b: 'input_ids' has length 9, over the largest bucket 8"):
        pad([{"clip_id": "a", "input_ids": np.arange(3)}, {"clip_id": "b", "input_ids": np.arange(9)}])
    with pytest.raises(ValueError, match=r"'audio' has shapes \[\(3,\), \(4,\)\] across clips \['a', 'b'\]: give"):
        PadBatch()([{"clip_id": "a", "audio": np.zeros(3)}, {"clip_id": "b", "audio": np.zeros(4)}])
