"""Grain input pipelines over clip TFRecords: shard, shuffle, decode, question, transform, batch.

    ds = make_dataset(manifest["splits"]["train"]["paths"], manifest["classes"], transform=t,
                      padding=t.padding(), config=PipelineConfig(batch_size=64, num_epochs=None))
    it = iter(ds)                      # a grain DatasetIterator: get_state() / set_state()
    batch = next(it)                   # this host's part of the step's batch (the trainer places it:
                                       # distill_jax.train.loop.place)

Each step is a Grain `MapDataset` transformation (random access, so batch i is a pure function
of i and the config, whatever the number of worker processes):
1. **positions**: element i of this host is record `shuffle_e(k * process_count + process_index)`
   of epoch e = i // per_host, k = i % per_host, where shuffle_e is Grain's `index_shuffle`
   seeded with seed + e (a different global permutation per epoch, the same on every host).
   The hosts' slots are disjoint and together cover the epoch. With `drop_remainder` (training)
   each host takes floor(N / hosts) slots (batches may span two epochs); without it
   (evaluation) ceil(N / hosts) rounded up to whole local batches, the extra slots repeating
   real records with `valid = 0`, so every host runs the same number of steps and every clip
   is counted once. With `on_error="skip"` a bad record's slot is filled the same way (the next
   readable record, `valid = 0`), its error in the row's `data_error`.
2. **decode** (`ReadExample`): the record's CRC is checked, the `tf.train.Example` parsed, the
   PCM turned into float32 audio in [-1, 1) and the JPEGs into RGB frames; the clip's question
   (`data_pipelines.questions`) is attached. The example dict holds
       clip_id (str), index (int, the record's position in the split), label (int),
       label_name (str), split (str), start_sec (float),
       valid (int), audio (float32 [samples]), sample_rate (int), frames (uint8 [T, H, W, 3]),
       fps (float), options (tuple of str), answer (int, index of the true class), question (str)
   (audio / frames only when `decode_audio` / `decode_frames`).
3. **transform**: the model's callable `example dict -> model input dict` of NumPy arrays
   (e.g. `transforms.Qwen2AudioTransform`: log-mel + prompt ids). It must be picklable (a
   top-level class or function). The pipeline adds valid, label and answer to its output.
4. **batch** (`PadBatch`): fixed-length arrays are stacked; arrays named in `padding` (a
   varying first axis, such as `input_ids`, or two, such as video patches [temporal patches,
   patches per temporal patch]) are padded to the smallest of a few bucket lengths that fits
   the batch, so jit sees a handful of shapes (a video prompt's length follows from its batch's
   video buckets: one shape per bucket pair); strings stay NumPy str arrays. On several hosts
   the hosts then agree on each batch's lengths, the largest any of them chose
   (`AgreeOnShapes`): the lengths one host would choose for the whole global batch.
5. **prefetch**: `read_threads` threads make batches ahead in each process; `worker_count` > 0
   makes them in Grain worker processes instead (`mp_prefetch`; workers read absl flags: run
   under `absl.app.run` or call `flags.FLAGS.mark_as_parsed()`, and keep the program behind
   `if __name__ == "__main__"`).

Resume: `it.get_state()` / `it.set_state(state)` (JSON-able), or through orbax with
`save_iterator_state` / `restore_iterator_state` or `grain.checkpoint.CheckpointSave/Restore`
inside an orbax Composite next to the model. A restored iterator yields exactly the batches the
saved one would have (same config; the state's layout depends on worker_count).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import grain
import numpy as np

from data_pipelines import media, tfrecord
from data_pipelines.questions import QuestionMaker


@dataclasses.dataclass(frozen=True)
class Pad:
    """How a varying-length field is padded in a batch: along axis 0 to a bucket length.

    buckets: the lengths axis 0 may take, the smallest that holds the batch's longest row is
    chosen (None: the longest row itself). inner / inner_buckets: axis 1 is padded too, on the
    right (video: temporal patches x patches per temporal patch). follows: axis 0's length is not
    bucketed but derived from the lengths chosen for field `follows` (axis 0 x axis 1 / `per`,
    plus `base`, rounded up to a multiple of `multiple`): a video prompt's length from its padded
    video layout, so a batch has one shape per video bucket pair.
    """
    buckets: tuple[int, ...] | None = None
    value: int | float = 0
    side: str = "right"  # "left" for prompts scored at their last position
    mask_key: str | None = None  # also emit a 0/1 int32 [B, bucket] mask under this name
    inner: bool = False
    inner_buckets: tuple[int, ...] | None = None
    follows: str | None = None
    base: int = 0
    per: int = 1
    multiple: int = 8

    def __post_init__(self):
        for name in ("buckets", "inner_buckets"):
            b = getattr(self, name)
            if b is not None and (not b or list(b) != sorted(set(b)) or b[0] < 1):
                raise ValueError(f"{name} must be increasing positive lengths, got {b}")
        if self.side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {self.side!r}")
        if self.follows is not None and (self.inner or self.per < 1 or self.multiple < 1 or self.base < 0):
            raise ValueError(f"a following Pad pads axis 0 only, with per >= 1, multiple >= 1, base >= 0: {self}")

    def length_for(self, leader: tuple[int, int]) -> int:
        """A following field's length for its leader's chosen (axis 0, axis 1) lengths."""
        n = self.base + leader[0] * leader[1] // self.per
        return -(-n // self.multiple) * self.multiple


def _bucket(buckets, longest: int) -> int | None:
    if buckets is None:
        return longest
    return next((b for b in buckets if b >= longest), None)


def padded_shape(batch: Mapping[str, np.ndarray], key: str, pad: Pad) -> tuple[int, ...]:
    """The lengths a padded field of a batch has: (axis 0,) or (axis 0, axis 1)."""
    return tuple(batch[key].shape[1:3 if pad.inner else 2])


def grow(batch: dict, padding: Mapping[str, Pad], shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """`batch` with its padded fields padded further to `shapes` (the same padding values and sides;
    masks grow with their field): what PadBatch would have made with those lengths chosen."""
    out = dict(batch)
    for key, pad in padding.items():
        have, want = padded_shape(batch, key, pad), tuple(shapes[key])
        if have == want:
            continue
        if any(w < h for w, h in zip(want, have)):
            raise ValueError(f"{key!r}: cannot shrink padded lengths {have} to {want}")
        value = batch[key]
        grown = np.full((value.shape[0], *want, *value.shape[1 + len(want):]), pad.value, value.dtype)
        masks = {}
        if pad.mask_key:
            masks[pad.mask_key] = np.zeros((value.shape[0], *want), batch[pad.mask_key].dtype)
        rows = slice(want[0] - have[0], want[0]) if pad.side == "left" else slice(0, have[0])
        index = (slice(None), rows, *(slice(0, n) for n in have[1:]))
        grown[index] = value
        for mask_key, mask in masks.items():
            mask[index] = batch[mask_key]
            out[mask_key] = mask
        out[key] = grown
    return out


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides which batches come out, and how fast.

    batch_size is global (all hosts); each host makes batch_size // process_count.
    num_epochs=None repeats forever. drop_remainder=True (training) drops what does not fill a
    batch; False (evaluation) pads with valid=0 examples instead (see the module docstring).
    """
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = 1
    drop_remainder: bool = True
    decode_audio: bool = True
    decode_frames: bool = True
    num_options: int = 10
    question_strategy: str = "uniform"
    question_seed: int = 0
    on_error: str = "raise"  # bad records: "raise", or "skip" (logged, counted, dropped)
    worker_count: int = 0  # Grain worker processes (0: in this process); the batches do not depend on it
    worker_buffer_size: int = 2  # batches each worker keeps ready
    read_threads: int = 2  # threads making batches in each process
    read_buffer_size: int = 4  # batches those threads keep ready

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.worker_count < 0 or self.read_threads < 1:
            raise ValueError(f"need worker_count >= 0 and read_threads >= 1, got {self.worker_count}, "
                             f"{self.read_threads}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")


# ---------------------------------------------------------------------------------------------
# Steps (top-level classes: Grain pickles them into its worker processes)
# ---------------------------------------------------------------------------------------------

class HostPositions:
    """Grain `map_with_index` step: element index -> (record position, valid) of this host."""

    def __init__(self, num_records: int, per_host: int, *, process_index: int, process_count: int,
                 shuffle: bool, seed: int):
        self.num_records, self.per_host = num_records, per_host
        self.process_index, self.process_count = process_index, process_count
        self.shuffle, self.seed = shuffle, seed

    def __call__(self, index: int, _element) -> tuple[int, int]:
        epoch, k = divmod(index, self.per_host)
        slot = k * self.process_count + self.process_index
        valid = slot < self.num_records
        slot %= self.num_records
        if self.shuffle:
            slot = int(grain.experimental.index_shuffle(
                slot, max_index=self.num_records - 1, seed=(self.seed + epoch) % 2**32, rounds=4))
        return slot, int(valid)


class ReadExample:
    """(record position, valid) -> the decoded example dict (module docstring, step 2).

    Every way a record can be bad (CRC, protobuf, features, label outside the class list, JPEG)
    is a `tfrecord.TFRecordError` naming file, offset, clip id and reason. With the source's
    `on_error="skip"` the bad record's slot is filled by the next readable record of the split,
    marked `valid = 0` (no loss, no score: batches keep their shape on every host) and carrying
    the error as JSON in `data_error` ("" for a good row), which the main process reports
    (`make_dataset(on_data_error=...)`)."""

    def __init__(self, source: tfrecord.TFRecordDataSource, class_names: Sequence[str],
                 questions: QuestionMaker, *, decode_audio: bool = True, decode_frames: bool = True):
        self.source, self.class_names, self.questions = source, tuple(class_names), questions
        self.decode_audio, self.decode_frames = decode_audio, decode_frames

    def __call__(self, item: tuple[int, int]) -> dict:
        position, valid = item
        try:
            return self.read(position, valid)
        except tfrecord.TFRecordError as e:
            if self.source.on_error == "raise":
                raise
            logging.warning("skipping a bad record: %s", e)
            return self.stand_in(position, json.dumps(e.to_dict()))

    def stand_in(self, position: int, error: str, use: Callable[[dict], dict] = lambda example: example,
                 bad: tuple[type[Exception], ...] = (tfrecord.TFRecordError,)) -> dict:
        """The next record after `position` that reads and that `use` takes without raising one of
        `bad`, marked invalid and carrying `error` (the skipped record's, for the error log)."""
        for step in range(1, len(self.source)):
            try:
                out = use(self.read((position + step) % len(self.source), 0))
            except bad:
                continue
            return {**out, "data_error": error}
        raise ValueError(f"no usable record among the {len(self.source)} records of {self.source.paths[:3]}")

    def read(self, position: int, valid: int) -> dict:
        where = self.source.location(position)
        clip = tfrecord.example_to_clip(self.source.read(position), where)
        bad = lambda reason: tfrecord.TFRecordError(*where, reason, clip.clip_id)
        index = clip.label_index
        if not 0 <= index < len(self.class_names) or self.class_names[index] != clip.label_name:
            raise bad(f"label {clip.label_name!r} (index {index}) does not match the class list "
                      f"({len(self.class_names)} classes): wrong manifest for these files?")
        question = self.questions(clip.clip_id, clip.label_name)
        example = {"clip_id": clip.clip_id, "index": position, "label": index, "label_name": clip.label_name,
                   "split": clip.split, "start_sec": clip.start_sec, "valid": valid, "options": question.options,
                   "answer": question.answer, "question": question.text(), "data_error": ""}
        if self.decode_audio:
            example["audio"] = clip.pcm16.astype(np.float32) / np.float32(32768.0)
            example["sample_rate"] = clip.sample_rate
        if self.decode_frames:
            try:
                frames = [media.decode_jpeg(j) for j in clip.jpeg_frames]
            except ValueError as e:
                raise bad(f"a video frame does not decode: {e}") from None
            shapes = {f.shape for f in frames}
            if not frames:
                raise bad("the record has no video frames")
            if len(shapes) != 1:
                raise bad(f"frames of different sizes {sorted(shapes)}")
            example["frames"] = np.stack(frames)
            example["fps"] = clip.fps
        return example


class ApplyTransform:
    """Runs the model's transform, carries clip_id / index / valid / label / answer into its
    output, and adds the clip's training targets (`targets(example)`: a dict of arrays, e.g. the
    teacher's letter joined by clip id) when given.

    A clip the transform refuses (a ValueError naming it: frames too small for a patch, audio it
    cannot read) is, with `reader` and its source's `on_error="skip"`, treated as a bad record: the
    next usable record of the split stands in, marked invalid, the error in its `data_error`."""

    def __init__(self, transform: Callable[[dict], dict] | None, targets: Callable[[dict], dict] | None = None,
                 reader: "ReadExample | None" = None):
        self.transform, self.targets, self.reader = transform, targets, reader

    def __call__(self, example: dict) -> dict:
        try:
            return self.apply(example)
        except ValueError as e:
            if self.reader is None or self.reader.source.on_error == "raise":
                raise
            path, offset = self.reader.source.location(int(example["index"]))
            logging.warning("skipping a clip its model cannot take: %s", e)
            error = json.dumps({"path": path, "offset": offset, "clip_id": str(example["clip_id"]),
                                "reason": f"model input: {e}"})
        # TFRecordError is a ValueError: a bad record is passed over too
        return self.reader.stand_in(int(example["index"]), error, use=self.apply, bad=(ValueError,))

    def apply(self, example: dict) -> dict:
        if self.transform is None:
            out = dict(example)
        else:
            out = self.transform(example)
            if not isinstance(out, Mapping):
                raise TypeError(f"clip {example['clip_id']}: the transform returned {type(out).__name__}, "
                                "not a dict")
            out = dict(out)
        for key in ("clip_id", "index", "valid", "label", "answer", "data_error"):
            out.setdefault(key, example[key])
        if self.targets is not None:
            targets = dict(self.targets(example))
            clash = sorted(set(targets) & set(out))
            if clash:
                raise ValueError(f"clip {example['clip_id']}: targets {clash} clash with the model inputs")
            out.update(targets)
        return out


class PadBatch:
    """Grain `batch_fn`: a list of example dicts -> one dict of batched NumPy arrays."""

    def __init__(self, padding: Mapping[str, Pad] | None = None):
        self.padding = dict(padding or {})
        for key, pad in self.padding.items():
            if pad.follows is not None and (pad.follows not in self.padding or not self.padding[pad.follows].inner):
                raise ValueError(f"Pad of {key!r} follows {pad.follows!r}, which needs a Pad with inner=True")

    def _pad(self, key: str, values: list[np.ndarray], pad: Pad, ids, length: int | None = None,
             ) -> dict[str, np.ndarray]:
        lengths = [len(v) for v in values]
        longest = max(lengths)
        bucket = _bucket(pad.buckets, longest) if length is None else length
        if bucket is None or bucket < longest:
            clip = ids[lengths.index(longest)]
            limit = (f"the {bucket} its batch's padded video allows (config.data.video_*_buckets and the text "
                     f"budget of {pad.base} tokens)" if length is not None else f"the largest bucket {pad.buckets[-1]}")
            raise ValueError(f"clip {clip}: {key!r} has length {longest}, over {limit}: add a bucket or shorten "
                             "the input")
        first = values[0]
        inner = None
        if pad.inner:
            widths = [v.shape[1] for v in values]
            inner = _bucket(pad.inner_buckets, max(widths))
            if inner is None:
                clip = ids[widths.index(max(widths))]
                raise ValueError(f"clip {clip}: {key!r} has {max(widths)} rows per item on axis 1, over the largest "
                                 f"bucket {pad.inner_buckets[-1]}: add a bucket")
        shape = (bucket,) if inner is None else (bucket, inner)
        out = np.full((len(values), *shape, *first.shape[len(shape):]), pad.value, dtype=first.dtype)
        mask = np.zeros((len(values), *shape), np.int32)
        for i, (v, n) in enumerate(zip(values, lengths)):
            rows = slice(bucket - n, bucket) if pad.side == "left" else slice(0, n)
            index = (i, rows) if inner is None else (i, rows, slice(0, v.shape[1]))
            out[index] = v
            mask[index] = 1
        return {key: out, **({pad.mask_key: mask} if pad.mask_key else {})}

    def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        keys = list(examples[0])
        ids = [e.get("clip_id", "?") for e in examples]
        for e in examples[1:]:
            if list(e) != keys:
                raise ValueError(f"clip {e.get('clip_id')}: keys {sorted(e)} differ from {sorted(keys)}")
        batch = {}
        followers = [k for k in keys if k in self.padding and self.padding[k].follows is not None]
        for key in keys:
            values = [e[key] for e in examples]
            if key in followers:
                continue
            if key in self.padding:
                batch.update(self._pad(key, [np.asarray(v) for v in values], self.padding[key], ids))
            elif isinstance(values[0], (tuple, list)) and values[0] and isinstance(values[0][0], str):
                batch[key] = np.asarray([list(v) for v in values])
            else:
                try:
                    batch[key] = np.stack([np.asarray(v) for v in values])
                except ValueError as e:
                    shapes = sorted({np.shape(v) for v in values})
                    raise ValueError(f"{key!r} has shapes {shapes} across clips {ids}: give it a Pad") from e
        for key in followers:
            pad = self.padding[key]
            length = pad.length_for(padded_shape(batch, pad.follows, self.padding[pad.follows]))
            batch.update(self._pad(key, [np.asarray(e[key]) for e in examples], pad, ids, length))
        return {k: batch[k] for k in [*keys, *(m for m in batch if m not in keys)]}


class AgreeOnShapes(grain.IterDataset):
    """The last steps of a multi-host pipeline, in the main process: every host's batch of a step is
    padded to the same lengths, the largest any host chose (one tiny all-gather per batch). The
    lengths are then those one host holding the whole global batch would have chosen, so N hosts
    run what one host runs. Every host must draw the same number of batches (the pipeline's
    positions see to it)."""

    def __init__(self, parent: grain.IterDataset, padding: Mapping[str, Pad]):
        super().__init__(parent)
        self.padding = {k: p for k, p in padding.items() if p.follows is None}
        self.followers = {k: p for k, p in padding.items() if p.follows is not None}

    def __iter__(self):
        return _AgreeingIterator(self._parent.__iter__(), self.padding, self.followers)


class _AgreeingIterator(grain.DatasetIterator):
    def __init__(self, parent, padding, followers):
        super().__init__(parent)
        self.padding, self.followers = padding, followers

    def __next__(self):
        from jax.experimental import multihost_utils

        batch = next(self._parent)
        keys = sorted(self.padding)
        mine = [padded_shape(batch, k, self.padding[k]) for k in keys]
        flat = np.asarray([n for shape in mine for n in shape], np.int32)
        agreed = np.asarray(multihost_utils.process_allgather(flat)).reshape(-1, flat.size).max(axis=0)
        shapes, at = {}, 0
        for key, shape in zip(keys, mine):
            shapes[key] = tuple(int(n) for n in agreed[at:at + len(shape)])
            at += len(shape)
        for key, pad in self.followers.items():
            shapes[key] = (pad.length_for(shapes[pad.follows]),)
        return grow(batch, {**self.padding, **self.followers}, shapes)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------

def _process_index_and_count(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


class ReportDataErrors(grain.IterDataset):
    """The last step, in the main process: `report(error dict)` for every skipped record of a
    batch (its row's `data_error`), so skips made in worker processes are never lost."""

    def __init__(self, parent: grain.IterDataset, report: Callable[[dict], None]):
        super().__init__(parent)
        self.report = report

    def __iter__(self):
        return _ReportingIterator(self._parent.__iter__(), self.report)


class _ReportingIterator(grain.DatasetIterator):
    def __init__(self, parent, report):
        super().__init__(parent)
        self.report = report

    def __next__(self):
        batch = next(self._parent)
        for error in batch.get("data_error", ()):
            if error:
                self.report(json.loads(str(error)))
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def index_problems(source: tfrecord.TFRecordDataSource) -> list[dict]:
    """One error per file whose framing is broken: its unreadable byte ranges, and how many
    records they cost (`records`: the file's converter sidecar `<file>.json` lists what was
    written; None when there is no sidecar to count from)."""
    by_file: dict[str, list[dict]] = {}
    for problem in source.problems:
        by_file.setdefault(problem["path"], []).append(problem)
    errors = []
    for path, problems in by_file.items():
        lost = None
        try:
            from etils import epath

            written = json.loads(epath.Path(path + ".json").read_text())["written"]
            lost = len(written) - source.file_counts[source.paths.index(path)]
        except (OSError, ValueError, KeyError):
            pass
        errors.append({"path": path, "offset": problems[0]["offset"], "clip_id": None, "records": lost,
                       "reason": "; ".join(p["reason"] for p in problems)})
    return errors


def make_dataset(paths: Sequence[str], class_names: Sequence[str], *, config: PipelineConfig,
                 transform: Callable[[dict], dict] | None = None, padding: Mapping[str, Pad] | None = None,
                 targets: Callable[[dict], dict] | None = None,
                 question_maker: QuestionMaker | None = None, process_index: int | None = None,
                 process_count: int | None = None,
                 on_data_error: Callable[[dict], None] | None = None) -> grain.IterDataset:
    """This host's Grain dataset of batches (dicts of NumPy arrays) of the clips in `paths`.

    `class_names` is the manifest's class list (label/index points into it; the questions draw
    from it unless `question_maker` is given). `targets(example) -> dict` adds each clip's
    training targets to its row (a complete batch: model inputs and targets). process_index /
    process_count default to JAX's. `on_data_error(error)` gets every unreadable byte range of
    the files (at once) and every skipped record (as its batch is read) with `on_error="skip"`.
    """
    process_index, process_count = _process_index_and_count(process_index, process_count)
    if config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {process_count} hosts")
    local_batch = config.batch_size // process_count
    source = tfrecord.TFRecordDataSource(paths, on_error=config.on_error)
    if on_data_error is not None:
        for problem in index_problems(source):
            on_data_error(problem)
    num_records = len(source)
    if num_records == 0:
        raise ValueError(f"no records in {len(source.paths)} files: {source.paths[:3]}")
    if config.drop_remainder:
        per_host = num_records // process_count
        if per_host < local_batch:
            raise ValueError(f"{num_records} records over {process_count} hosts fill no batch of {local_batch}")
    else:
        per_host = math.ceil(math.ceil(num_records / process_count) / local_batch) * local_batch
    questions = question_maker or QuestionMaker(class_names, num_options=config.num_options,
                                                strategy=config.question_strategy, seed=config.question_seed)

    ds = grain.MapDataset.range(per_host).repeat(config.num_epochs)
    ds = ds.map_with_index(HostPositions(num_records, per_host, process_index=process_index,
                                         process_count=process_count, shuffle=config.shuffle, seed=config.seed))
    reader = ReadExample(source, class_names, questions, decode_audio=config.decode_audio,
                         decode_frames=config.decode_frames)
    ds = ds.map(reader)
    ds = ds.map(ApplyTransform(transform, targets, reader))
    # Batching random-access elements makes batch i the same whatever the number of workers.
    ds = ds.batch(local_batch, drop_remainder=config.drop_remainder, batch_fn=PadBatch(padding))
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                   prefetch_buffer_size=config.read_buffer_size))
    if config.worker_count > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    if process_count > 1 and padding:
        iter_ds = AgreeOnShapes(iter_ds, padding)
    if on_data_error is not None:
        iter_ds = ReportDataErrors(iter_ds, on_data_error)
    return iter_ds


def save_iterator_state(directory, iterator) -> None:
    """Saves a Grain iterator's position with orbax (one JSON file per host) in `directory`."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as checkpointer:
        checkpointer.save(directory, args=grain.checkpoint.CheckpointSave(iterator))


def restore_iterator_state(directory, iterator):
    """Moves `iterator` (fresh, from the same dataset) to the position saved in `directory`."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as checkpointer:
        return checkpointer.restore(directory, args=grain.checkpoint.CheckpointRestore(iterator))
