"""TFRecord files of `tf.train.Example` clips, written and read without TensorFlow.

Framing is TensorFlow's (`tensorflow/core/lib/io/record_writer.cc`); each record is

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32), so
`tf.data.TFRecordDataset` reads our files unchanged. The data of a clip record is a
`tf.train.Example` (the wire format of `tensorflow_datasets.proto.tf_example_pb2`) with these
features, which `tf.io.parse_single_example` parses with the obvious FixedLen/VarLen specs:

    key                 type              value
    clip/id             bytes             clip id, e.g. "---g-f_I2yQ_000001" (YouTube id + start)
    clip/start_sec      float             start of the clip in its source video, seconds
    label/index         int64             index of the label in the dataset manifest's class list
    label/name          bytes             the label, UTF-8 ("dog barking")
    audio/pcm16         bytes             mono little-endian int16 samples
    audio/sample_rate   int64             samples per second (16000)
    video/jpeg          bytes list        one JPEG per sampled frame, in time order
    video/fps           float             frames per second of the sampled frames
    split               bytes             "train", "analysis", "test", ...

`TFRecordWriter` writes a file atomically (a temporary name, renamed on close), so a file
that exists is complete. `TFRecordDataSource` is Grain's random-access source over an offset
index of one or more files: it checks every length CRC when it builds the index and every
data CRC when it reads a record. A bad record is a `TFRecordError` naming the file and the
offset, or, with `on_error="skip"`, a logged and counted skip.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import struct
from collections.abc import Sequence

import google_crc32c
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # length, masked CRC of the length bytes
_FOOTER = struct.Struct("<I")  # masked CRC of the data

FEATURE_KEYS = ("clip/id", "clip/start_sec", "label/index", "label/name", "audio/pcm16",
                "audio/sample_rate", "video/jpeg", "video/fps", "split")


class TFRecordError(ValueError):
    """A TFRecord file or record that cannot be read or parsed; the message names the file, the
    offset, the clip id when it is known, and the reason."""

    def __init__(self, path: str, offset: int, reason: str, clip_id: str | None = None):
        clip = f" (clip {clip_id})" if clip_id else ""
        super().__init__(f"TFRecord {path}: record at byte offset {offset}{clip}: {reason}")
        self.path, self.offset, self.reason, self.clip_id = path, offset, reason, clip_id

    def to_dict(self) -> dict:
        return {"path": self.path, "offset": self.offset, "clip_id": self.clip_id, "reason": self.reason}


# ---------------------------------------------------------------------------------------------
# CRC and framing
# ---------------------------------------------------------------------------------------------

if google_crc32c.implementation != "c":  # the pure-Python fallback is ~1000x slower
    logging.warning("google_crc32c has no C extension here; TFRecord CRCs will be slow")


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`; crc32c(b"123456789") == 0xE3069283."""
    return google_crc32c.value(bytes(data))


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """`data` framed as one TFRecord record (header, data, footer)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data))


class TFRecordWriter:
    """Writes records to `path` through `path + ".tmp"`, renamed to `path` by `close()`.

    As a context manager an exception inside the block removes the temporary file instead, so
    `path` never holds a partly written file.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._tmp = self.path + ".tmp"
        self._file = open(self._tmp, "wb")
        self.num_records = 0

    def write(self, data: bytes) -> None:
        self._file.write(frame_record(data))
        self.num_records += 1

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_index(path, *, on_error: str = "raise") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Data offsets and lengths of every record of a TFRecord file, checking the framing.

    Reads only the 12-byte headers (and checks their CRCs) and that each record's data and
    footer lie inside the file. Returns `(data_offsets int64, data_lengths int64, problems)`.
    A bad header or a truncated record raises `TFRecordError`; with `on_error="skip"` the index
    resumes at the next intact record after it (`_resync`), and the unreadable byte range is
    returned as a problem {"path", "offset", "end", "reason"}.
    """
    _check_on_error(on_error)
    path = os.fspath(path)
    size = _size(path)
    offsets, lengths, problems = [], [], []
    with _open(path) as f:
        offset = 0
        while offset < size:
            f.seek(offset)
            header = f.read(_HEADER.size)
            problem = None
            if len(header) < _HEADER.size:
                problem = f"truncated: {len(header)} header bytes where 12 are needed (file size {size})"
            else:
                length, length_crc = _HEADER.unpack(header)
                if masked_crc32c(header[:8]) != length_crc:
                    problem = "length CRC mismatch (corrupt header)"
                elif offset + _HEADER.size + length + _FOOTER.size > size:
                    problem = (f"truncated: the record declares {length} data bytes but the file ends "
                               f"{size - offset - _HEADER.size} bytes after the header")
            if problem is not None:
                if on_error == "raise":
                    raise TFRecordError(path, offset, problem)
                resume = _resync(f, offset + 1, size)
                problems.append({"path": path, "offset": offset, "end": resume, "reason":
                                 f"{problem}; bytes {offset}..{resume} unreadable" +
                                 ("" if resume < size else " (the rest of the file)")})
                offset = resume
                continue
            offsets.append(offset + _HEADER.size)
            lengths.append(length)
            offset += _HEADER.size + length + _FOOTER.size
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), problems


def _resync(f, start: int, size: int, window: int = 1 << 20) -> int:
    """The offset of the first intact record at or after `start` (its length CRC and its data
    CRC both check), or `size` if there is none. Candidates are found with NumPy over windows
    of the file (a plausible length, then its CRC), so a corrupt header costs about one pass
    over the bytes up to the next record."""
    position = start
    while position + _HEADER.size <= size:
        f.seek(position)
        chunk = f.read(window + _HEADER.size)
        count = len(chunk) - _HEADER.size + 1
        if count <= 0:
            break
        raw = np.frombuffer(chunk, np.uint8)
        lengths = np.zeros(count, np.uint64)
        for k in range(8):
            lengths |= raw[k:k + count].astype(np.uint64) << np.uint64(8 * k)
        at = position + np.arange(count, dtype=np.int64)
        room = (size - at - _HEADER.size - _FOOTER.size).clip(min=0).astype(np.uint64)
        for i in np.flatnonzero(lengths <= room).tolist():
            header = chunk[i:i + _HEADER.size]
            if masked_crc32c(header[:8]) != _HEADER.unpack(header)[1]:
                continue
            length = int(lengths[i])
            f.seek(position + i + _HEADER.size)
            body = f.read(length + _FOOTER.size)
            if len(body) == length + _FOOTER.size and masked_crc32c(body[:length]) == _FOOTER.unpack(body[length:])[0]:
                return position + i
        position += count
    return size


def _remote(path: str) -> bool:
    return "://" in path


def _open(path: str):
    """A binary reader of a local file, or of a remote one (gs://) through etils.epath."""
    if _remote(path):
        from etils import epath

        return epath.Path(path).open("rb")
    return open(path, "rb")


def _size(path: str) -> int:
    if _remote(path):
        from etils import epath

        return int(epath.Path(path).stat().length)
    return os.path.getsize(path)


def iter_records(path):
    """Every record's data of one TFRecord file, in order, each CRC checked (sequential reader)."""
    path = os.fspath(path)
    offsets, lengths, _ = read_index(path)
    with _open(path) as f:
        for offset, length in zip(offsets.tolist(), lengths.tolist()):
            f.seek(offset)
            data = f.read(length + _FOOTER.size)
            _check_data(path, offset - _HEADER.size, data[:length], data[length:])
            yield data[:length]


def _check_data(path: str, record_offset: int, data: bytes, footer: bytes) -> None:
    (stored,) = _FOOTER.unpack(footer)
    computed = masked_crc32c(data)
    if stored != computed:
        raise TFRecordError(path, record_offset,
                            f"data CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


class TFRecordDataSource:
    """Random access to the records of TFRecord files: `len(source)`, `source[i] -> bytes`.

    Builds an offset index at construction (reading only record headers) and checks the data
    CRC of each record it reads. Picklable for Grain worker processes: the index is pickled,
    open files are not (each process opens its own, read with `os.pread`, thread-safe).

    on_error: "raise" (default) makes any bad record a `TFRecordError` naming file and offset.
        "skip" steps over unreadable byte ranges at indexing (listed in `problems`, dicts with
        path, offset, end, reason) and makes `source[i]` of a record with a bad data CRC count it
        in `num_skipped` (per process) and return None. `source.read(i)` always raises: the
        input pipeline (`pipeline.ReadExample`) reports and replaces what it skips.
    """

    def __init__(self, paths: Sequence[str] | str, *, on_error: str = "raise"):
        _check_on_error(on_error)
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("TFRecordDataSource needs at least one file, got none")
        self.on_error = on_error
        self.problems: list[dict] = []
        file_ids, offsets, lengths = [], [], []
        for i, path in enumerate(self.paths):
            o, n, problems = read_index(path, on_error=on_error)
            file_ids.append(np.full(len(o), i, np.int32))
            offsets.append(o)
            lengths.append(n)
            self.problems.extend(problems)
        self.file_counts = [len(o) for o in offsets]  # records indexed per file
        self._file_ids = np.concatenate(file_ids)
        self._offsets = np.concatenate(offsets)
        self._lengths = np.concatenate(lengths)
        self.num_skipped = 0
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._offsets)

    def location(self, index: int) -> tuple[str, int]:
        """(file, byte offset of the record) of record `index`."""
        return self.paths[int(self._file_ids[index])], int(self._offsets[index]) - _HEADER.size

    def __getitem__(self, index: int) -> bytes | None:
        try:
            return self.read(index)
        except TFRecordError as e:
            if self.on_error == "raise":
                raise
            self.num_skipped += 1
            logging.warning("skipping record %d: %s", index, e)
            return None

    def read(self, index: int) -> bytes:
        """Record `index`'s data, its CRC checked; a `TFRecordError` whatever `on_error` says."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        file_id = int(self._file_ids[index])
        offset, length = int(self._offsets[index]), int(self._lengths[index])
        path = self.paths[file_id]
        if _remote(path):  # remote files: one ranged read per record
            with _open(path) as f:
                f.seek(offset)
                data = f.read(length + _FOOTER.size)
        else:
            fd = self._fds.get(file_id)
            if fd is None:
                fd = self._fds[file_id] = os.open(path, os.O_RDONLY)
            data = os.pread(fd, length + _FOOTER.size, offset)
        if len(data) != length + _FOOTER.size:
            raise TFRecordError(path, offset - _HEADER.size, "file changed since indexing (short read)")
        _check_data(path, offset - _HEADER.size, data[:length], data[length:])
        return data[:length]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"TFRecordDataSource({len(self.paths)} files, {len(self)} records, on_error={self.on_error!r})"


# ---------------------------------------------------------------------------------------------
# Clip examples
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Clip:
    """One clip as stored in a record (see the feature table in the module docstring)."""
    clip_id: str
    start_sec: float
    label_index: int
    label_name: str
    pcm16: np.ndarray  # int16 [num_samples], mono
    sample_rate: int
    jpeg_frames: tuple[bytes, ...]
    fps: float
    split: str


def clip_to_example(clip: Clip) -> bytes:
    """The serialized `tf.train.Example` of `clip`."""
    pcm = np.asarray(clip.pcm16)
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError(f"clip {clip.clip_id}: pcm16 must be 1-D int16, got {pcm.dtype} {pcm.shape}")
    example = tf_example_pb2.Example()
    feature = example.features.feature
    feature["clip/id"].bytes_list.value.append(clip.clip_id.encode("utf-8"))
    feature["clip/start_sec"].float_list.value.append(float(clip.start_sec))
    feature["label/index"].int64_list.value.append(int(clip.label_index))
    feature["label/name"].bytes_list.value.append(clip.label_name.encode("utf-8"))
    feature["audio/pcm16"].bytes_list.value.append(pcm.astype("<i2").tobytes())
    feature["audio/sample_rate"].int64_list.value.append(int(clip.sample_rate))
    feature["video/jpeg"].bytes_list.value.extend(clip.jpeg_frames)
    feature["video/fps"].float_list.value.append(float(clip.fps))
    feature["split"].bytes_list.value.append(clip.split.encode("utf-8"))
    return example.SerializeToString(deterministic=True)  # sorted map keys: same bytes in every process


def _one(feature, key: str, kind: str, clip_id: str, where):
    values = getattr(feature[key], kind).value
    if len(values) != 1:
        raise TFRecordError(*where, f"feature {key!r} has {len(values)} values in {kind}, expected 1", clip_id)
    return values[0]


def example_to_clip(data: bytes, where: tuple[str, int] = ("<bytes>", -1)) -> Clip:
    """Parses a serialized clip `tf.train.Example`. Anything that is not a well-formed clip (not a
    protobuf, a missing or mistyped feature, an empty clip id, odd-length PCM, text that is not
    UTF-8) is a `TFRecordError` naming `where` (file, record offset), the clip id when it is
    readable, and the reason."""
    from google.protobuf.message import DecodeError

    try:
        example = tf_example_pb2.Example.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise TFRecordError(*where, f"not a tf.train.Example ({type(e).__name__}: {e})") from None
    feature = example.features.feature
    ids = feature["clip/id"].bytes_list.value if "clip/id" in feature else []
    try:
        clip_id = ids[0].decode("utf-8") if len(ids) == 1 else None
        missing = [key for key in FEATURE_KEYS if key not in feature]
        if missing:
            raise TFRecordError(*where, f"example lacks features {missing}", clip_id)
        if not clip_id:
            raise TFRecordError(*where, f"feature 'clip/id' is empty or has {len(ids)} values, expected 1 non-empty")
        pcm = _one(feature, "audio/pcm16", "bytes_list", clip_id, where)
        if len(pcm) % 2:
            raise TFRecordError(*where, f"audio/pcm16 has {len(pcm)} bytes: int16 samples need an even count",
                                clip_id)
        return Clip(
            clip_id=clip_id,
            start_sec=float(_one(feature, "clip/start_sec", "float_list", clip_id, where)),
            label_index=int(_one(feature, "label/index", "int64_list", clip_id, where)),
            label_name=_one(feature, "label/name", "bytes_list", clip_id, where).decode("utf-8"),
            pcm16=np.frombuffer(pcm, dtype="<i2").astype(np.int16),
            sample_rate=int(_one(feature, "audio/sample_rate", "int64_list", clip_id, where)),
            jpeg_frames=tuple(feature["video/jpeg"].bytes_list.value),
            fps=float(_one(feature, "video/fps", "float_list", clip_id, where)),
            split=_one(feature, "split", "bytes_list", clip_id, where).decode("utf-8"),
        )
    except UnicodeDecodeError as e:
        raise TFRecordError(*where, f"text that is not UTF-8 ({e})") from None
