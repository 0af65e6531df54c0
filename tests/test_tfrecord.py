"""data_pipelines.tfrecord: CRC-32C and TFRecord framing against independent references, round
trips, corrupt and truncated files, and clip examples parsed back by tfds's NumPy parser."""
import json
import os
import pickle
import struct

import numpy as np
import pytest
from tensorflow_datasets.core import example_parser
from tensorflow_datasets.core import features as tfds_features

from data_pipelines import media, tfrecord


def _crc32c_reference(data: bytes) -> int:
    """Bit-by-bit CRC-32C (reflected polynomial 0x82F63B78): slow, obviously right."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_vectors():
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    assert tfrecord.crc32c(b"") == 0
    assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert tfrecord.crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of 0xff
    rng = np.random.default_rng(0)
    for n in (1, 7, 100, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tfrecord.crc32c(data) == _crc32c_reference(data)


def test_masked_crc_and_framing():
    crc = 0xE3069283
    assert tfrecord.masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    data = b"hello tfrecord"
    framed = tfrecord.frame_record(data)
    length = struct.pack("<Q", len(data))
    assert framed[:8] == length
    assert struct.unpack("<I", framed[8:12])[0] == _masked(_crc32c_reference(length))
    assert framed[12:12 + len(data)] == data
    assert struct.unpack("<I", framed[-4:])[0] == _masked(_crc32c_reference(data))
    assert len(framed) == 16 + len(data)


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes() for _ in range(n)]


def _write(path, records):
    with tfrecord.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)
    return str(path)


def test_round_trip_sequential_and_random_access(tmp_path):
    a, b = _records(5, seed=1), _records(4, seed=2)
    pa, pb = _write(tmp_path / "a.tfrecord", a), _write(tmp_path / "b.tfrecord", b)
    assert list(tfrecord.iter_records(pa)) == a
    assert os.path.getsize(pa) == sum(len(r) + 16 for r in a)
    source = tfrecord.TFRecordDataSource([pa, pb])
    assert len(source) == 9
    assert [source[i] for i in range(9)] == a + b
    assert [source[i] for i in (8, 0, 5, 3)] == [b[3], a[0], b[0], a[3]]  # random order
    clone = pickle.loads(pickle.dumps(source))  # what Grain sends to its worker processes
    assert [clone[i] for i in range(9)] == a + b
    with pytest.raises(IndexError):
        source[9]


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "x.tfrecord"
    with pytest.raises(RuntimeError):
        with tfrecord.TFRecordWriter(path) as w:
            w.write(b"abc")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_flipped_data_byte_is_a_crc_error_naming_file_and_offset(tmp_path):
    records = _records(4, seed=3)
    records[2] = records[2] or b"x"
    path = _write(tmp_path / "c.tfrecord", records)
    record_offset = sum(len(r) + 16 for r in records[:2])
    _flip(path, record_offset + 12 + len(records[2]) // 2)

    source = tfrecord.TFRecordDataSource(path)  # the index only reads headers: still fine
    assert source[1] == records[1] and source[3] == records[3]
    with pytest.raises(tfrecord.TFRecordError, match=f"c.tfrecord: record at byte offset {record_offset}: data CRC"):
        source[2]
    with pytest.raises(tfrecord.TFRecordError, match=f"offset {record_offset}"):
        list(tfrecord.iter_records(path))

    skipping = tfrecord.TFRecordDataSource(path, on_error="skip")
    assert [skipping[i] for i in range(4)] == [records[0], records[1], None, records[3]]
    assert skipping.num_skipped == 1


def test_flipped_length_byte_is_a_header_error(tmp_path):
    records = _records(3, seed=4)
    path = _write(tmp_path / "h.tfrecord", records)
    offset = len(records[0]) + 16
    _flip(path, offset + 1)  # the second record's length field
    with pytest.raises(tfrecord.TFRecordError, match=f"h.tfrecord: record at byte offset {offset}: length CRC"):
        tfrecord.TFRecordDataSource(path)
    skipping = tfrecord.TFRecordDataSource(path, on_error="skip")  # resumes at the third record
    assert [skipping[i] for i in range(len(skipping))] == [records[0], records[2]]
    (problem,) = skipping.problems
    assert problem["offset"] == offset and problem["end"] == offset + len(records[1]) + 16
    assert "length CRC mismatch" in problem["reason"]


@pytest.mark.parametrize("cut", [3, 9, 20])  # inside the footer, the header, the data of the last record
def test_truncated_file(tmp_path, cut):
    records = [b"a" * 30, b"b" * 40, b"c" * 50]
    path = _write(tmp_path / "t.tfrecord", records)
    size = os.path.getsize(path)
    last = size - (50 + 16)
    keep = {3: size - 3, 9: last + 9, 20: last + 20}[cut]
    with open(path, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(tfrecord.TFRecordError, match=f"t.tfrecord: record at byte offset {last}: truncated"):
        tfrecord.TFRecordDataSource(path)
    skipping = tfrecord.TFRecordDataSource(path, on_error="skip")
    assert [skipping[i] for i in range(len(skipping))] == records[:2]
    assert "truncated" in skipping.problems[0]["reason"] and skipping.problems[0]["offset"] == last


def _clip(**overrides):
    rng = np.random.default_rng(5)
    frames = [media.encode_jpeg(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)) for _ in range(3)]
    values = dict(clip_id="abc_000010", start_sec=10.0, label_index=7, label_name="cattle, bovinae cowbell",
                  pcm16=rng.integers(-32768, 32767, 1601, dtype=np.int16), sample_rate=16000,
                  jpeg_frames=tuple(frames), fps=2.0, split="train")
    values.update(overrides)
    return tfrecord.Clip(**values)


def test_clip_example_parses_back_with_tfds_numpy_parser():
    clip = _clip()
    data = tfrecord.clip_to_example(clip)
    spec = {
        "clip/id": tfds_features.TensorInfo(shape=(), dtype=np.object_),
        "clip/start_sec": tfds_features.TensorInfo(shape=(), dtype=np.float32),
        "label/index": tfds_features.TensorInfo(shape=(), dtype=np.int64),
        "label/name": tfds_features.TensorInfo(shape=(), dtype=np.object_),
        "audio/pcm16": tfds_features.TensorInfo(shape=(), dtype=np.object_),
        "audio/sample_rate": tfds_features.TensorInfo(shape=(), dtype=np.int64),
        "video/jpeg": tfds_features.TensorInfo(shape=(None,), dtype=np.object_),
        "video/fps": tfds_features.TensorInfo(shape=(), dtype=np.float32),
        "split": tfds_features.TensorInfo(shape=(), dtype=np.object_),
    }
    parsed = example_parser.ExampleParserNp(spec).parse_example(data)
    assert parsed["clip/id"] == b"abc_000010"
    assert parsed["clip/start_sec"] == 10.0
    assert parsed["label/index"] == 7
    assert parsed["label/name"].decode() == "cattle, bovinae cowbell"
    np.testing.assert_array_equal(np.frombuffer(parsed["audio/pcm16"], "<i2"), clip.pcm16)
    assert parsed["audio/sample_rate"] == 16000
    assert list(parsed["video/jpeg"]) == list(clip.jpeg_frames)
    assert parsed["video/fps"] == 2.0 and parsed["split"] == b"train"
    # Our own parser gives the same clip back.
    back = tfrecord.example_to_clip(data)
    np.testing.assert_array_equal(back.pcm16, clip.pcm16)
    assert back.jpeg_frames == clip.jpeg_frames
    assert (back.clip_id, back.start_sec, back.label_index, back.label_name, back.sample_rate, back.fps, back.split) \
        == (clip.clip_id, clip.start_sec, clip.label_index, clip.label_name, clip.sample_rate, clip.fps, clip.split)


def _bad_contents() -> dict[str, tuple[bytes, str]]:
    """Records whose framing and CRCs are fine but whose content is not a clip -> (bytes, reason)."""
    from tensorflow_datasets.proto import tf_example_pb2

    def edited(edit):
        example = tf_example_pb2.Example.FromString(tfrecord.clip_to_example(_clip()))
        edit(example.features.feature)
        return example.SerializeToString()

    def odd_pcm(feature):
        feature["audio/pcm16"].bytes_list.value[0] += b"\x01"

    def empty_id(feature):
        feature["clip/id"].bytes_list.value[0] = b""

    return {"missing feature": (edited(lambda f: f.__delitem__("audio/sample_rate")),
                                r"\(clip abc_000010\): example lacks features \['audio/sample_rate'\]"),
            "empty clip id": (edited(empty_id), "feature 'clip/id' is empty"),
            "odd-length PCM": (edited(odd_pcm), r"\(clip abc_000010\): audio/pcm16 has 3203 bytes"),
            "not a protobuf": (b"\xff\xfe\x00 this is not a protobuf", "not a tf.train.Example")}


@pytest.mark.parametrize("kind", ["missing feature", "empty clip id", "odd-length PCM", "not a protobuf"])
def test_bad_record_content_is_a_tfrecord_error_naming_file_and_offset(tmp_path, kind):
    data, reason = _bad_contents()[kind]
    good = tfrecord.clip_to_example(_clip())
    path = _write(tmp_path / "bad.tfrecord", [good, data])
    source = tfrecord.TFRecordDataSource(path)
    offset = len(good) + 16
    assert source.location(1) == (str(path), offset)
    with pytest.raises(tfrecord.TFRecordError, match=f"bad.tfrecord: record at byte offset {offset}.*{reason}"):
        tfrecord.example_to_clip(source.read(1), source.location(1))
    ids, errors = _read_all(path, "skip")  # skip mode: skipped, reported, no crash
    assert ids == ["abc_000010"] and [(e["offset"], e["path"]) for e in errors] == [(offset, str(path))]
    with pytest.raises(ValueError, match="pcm16 must be 1-D int16"):
        tfrecord.clip_to_example(_clip(pcm16=np.zeros(4, np.float32)))


def _fuzz_file(tmp_path, count=8):
    clips = [_clip(clip_id=f"clip{i:03d}", pcm16=np.random.default_rng(i).integers(-9, 9, 400 + 37 * i, np.int16))
             for i in range(count)]
    records = [tfrecord.clip_to_example(c) for c in clips]
    path = _write(tmp_path / "fuzz.tfrecord", records)
    bounds = np.cumsum([0] + [len(r) + 16 for r in records])
    return open(path, "rb").read(), [c.clip_id for c in clips], bounds


def _read_all(path, on_error):
    """Every clip id a pipeline reader gets from `path`, and the errors it reports (skip mode)."""
    from data_pipelines.pipeline import ReadExample
    from data_pipelines.questions import QuestionMaker

    source = tfrecord.TFRecordDataSource(path, on_error=on_error)
    errors = list(source.problems)
    classes = [f"class {i}" for i in range(7)] + ["cattle, bovinae cowbell"]
    read = ReadExample(source, classes, QuestionMaker(classes, num_options=4), decode_frames=False)
    ids = []
    for i in range(len(source)):
        example = read((i, 1))
        if example["data_error"]:
            errors.append(json.loads(example["data_error"]))
        else:
            ids.append(example["clip_id"])
    return ids, errors


def test_fuzzed_files_fail_only_with_named_errors_and_skip_loses_exactly_the_corrupted_records(tmp_path):
    """600 seeded corruptions of a file of 8 real clip records (300 bit flips, 300 truncations):
    reading with on_error="raise" either succeeds or raises a TFRecordError naming the file and an
    offset; with "skip" the reader returns every record the corruption did not touch, in order,
    and reports one error per corrupted record."""
    original, ids, bounds = _fuzz_file(tmp_path)
    path = tmp_path / "corrupt.tfrecord"
    rng = np.random.default_rng(0)
    outcomes = {"raised": 0, "clean": 0}
    for trial in range(600):
        data = bytearray(original)
        if trial % 2:
            cut = int(rng.integers(1, len(original)))
            data = data[:cut]
            hit = [k for k in range(len(ids)) if bounds[k + 1] > cut]  # records not wholly kept
            corrupted = 1 if cut not in bounds else 0  # a cut mid-record leaves one torn record
        else:
            at = int(rng.integers(0, len(original)))
            data[at] ^= 1 << int(rng.integers(0, 8))
            hit = [int(np.searchsorted(bounds, at, side="right") - 1)]
            corrupted = 1
        path.write_bytes(bytes(data))
        try:
            _read_all(path, "raise")
            outcomes["clean"] += 1
        except tfrecord.TFRecordError as e:  # any other exception type fails the test
            assert str(path) in str(e) and "byte offset" in str(e), str(e)
            outcomes["raised"] += 1
        kept, errors = _read_all(path, "skip")
        assert kept == [c for k, c in enumerate(ids) if k not in hit], (trial, kept)
        assert len(errors) == corrupted, (trial, errors)
        assert all(e["path"] == str(path) and e["reason"] for e in errors)
    assert outcomes["raised"] >= 590, outcomes  # every flip (CRC-32C sees any one bit) and every cut inside a record
