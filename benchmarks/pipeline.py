"""Input pipeline throughput (examples/s): read + CRC + parse + decode (PCM, JPEG frames) +
question, with and without the Qwen2-Audio transform (log-mel + prompt ids), batched.

Presets (records are made here, in a temporary directory):
    toy     toy-world clips as the converter stores them: 2 s of audio, 8 frames of 64x64
    10s20f  VGGSound-like: 10 s of audio, 20 frames of 448x796 (2 fps, short side 448)

    python benchmarks/pipeline.py                           # both presets, 0 / 1 / 2 workers
    python benchmarks/pipeline.py --presets=toy --workers=0,2 --batches=40

Worker counts: 0 = in the main process (its `read_threads` threads); N = N Grain worker
processes.

Headroom: the best rate with the transform against the rate the distill step consumes clips
(batch / step time) at paper scale, from the latest `tpu_aot.py` record of each slice: the
Qwen2-Audio-7B distill step at 50 % MFU (a v5e-8, v4-8 or v5p-8 is one host). Printed with
the host cores that rate needs at this machine's per-core rate. Prints the tables and appends
a JSON line to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from common import RESULTS, append_result, machine, print_table, versions  # noqa: E402
from data_pipelines import media, tfrecord  # noqa: E402
from data_pipelines import toy_world as tw  # noqa: E402
from data_pipelines.pipeline import PipelineConfig, make_dataset  # noqa: E402
from data_pipelines.transforms import Qwen2AudioTransform  # noqa: E402
from distill_jax.aot import TOPOLOGIES  # noqa: E402
from distill_jax.toy_tokenizer import make_qwen2_tokenizer  # noqa: E402

CLASSES = [c.name for c in tw.CLASSES]


def toy_clip(i: int) -> tfrecord.Clip:
    config = tw.WorldConfig()
    label = i % 16
    frames, audio = tw.render_clip(label, tw.clip_rng(config, label, "train", i), config)
    pcm = np.round(audio * 32767).astype(np.int16)
    return tfrecord.Clip(clip_id=f"toy{i:05d}", start_sec=0.0, label_index=label, label_name=CLASSES[label],
                         pcm16=pcm, sample_rate=16000, jpeg_frames=tuple(media.encode_jpeg(f) for f in frames[::2]),
                         fps=4.0, split="train")


def vggsound_like_clip(i: int) -> tfrecord.Clip:
    rng = np.random.default_rng(i)
    # Smooth random pictures (upsampled noise) compress like natural frames, unlike white noise.
    coarse = rng.integers(0, 256, (20, 14, 25, 3)).astype(np.float32)
    frames = np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2)[:, :448, :796].astype(np.uint8)
    pcm = (3000 * rng.standard_normal(160000)).astype(np.int16)
    label = i % len(CLASSES)
    return tfrecord.Clip(clip_id=f"vgg{i:05d}", start_sec=0.0, label_index=label, label_name=CLASSES[label],
                         pcm16=pcm, sample_rate=16000, jpeg_frames=tuple(media.encode_jpeg(f) for f in frames),
                         fps=2.0, split="train")


# clip maker, clip seconds, the chunk the audio is padded to (the window is computed, not the padding)
PRESETS = {"toy": (toy_clip, 2.0, 2.0), "10s20f": (vggsound_like_clip, 10.0, 30.0)}


def distill_consumption() -> list[tuple[str, float]]:
    """(slice, clips/s) the 7B distill step eats at 50 % MFU, from the latest tpu_aot records."""
    latest = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            for line in f:
                r = json.loads(line)
                if r.get("benchmark") == "tpu_aot" and "distill" in r["program"] and "model_flops_per_chip" in r:
                    latest[r["topology"]] = r
    out = []
    for name, r in sorted(latest.items()):
        step_s = r["model_flops_per_chip"] / (0.5 * TOPOLOGIES[name].peak_tflops * 1e12)
        out.append((name, r["workload"]["batch_size"] / step_s))
    return out


def write_records(path: str, make_clip, count: int) -> None:
    with tfrecord.TFRecordWriter(path) as writer:
        for i in range(count):
            writer.write(tfrecord.clip_to_example(make_clip(i)))


def examples_per_second(path, *, batch_size, batches, workers, transform) -> tuple[float, float]:
    """(steady-state examples/s over `batches` batches after the first, seconds to the first batch)."""
    config = PipelineConfig(batch_size=batch_size, num_epochs=None, worker_count=workers, read_threads=2,
                            worker_buffer_size=2)
    padding = transform.padding(buckets=(512, 1024, 2048)) if transform is not None else None
    ds = make_dataset([path], CLASSES, config=config, transform=transform, padding=padding,
                      process_index=0, process_count=1)
    start = time.perf_counter()
    it = iter(ds)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - start)
    it.close()
    return rate, first


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="toy,10s20f")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=20, help="timed batches (after the first)")
    p.add_argument("--records", type=int, default=64, help="distinct records written (then repeated)")
    args = p.parse_args()
    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags



    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = make_qwen2_tokenizer(os.path.join(tmp, "tok"))
        for preset in args.presets.split(","):
            make_clip, clip_seconds, chunk_seconds = PRESETS[preset]
            path = os.path.join(tmp, f"{preset}.tfrecord")
            write_records(path, make_clip, args.records)
            mb_per_record = os.path.getsize(path) / args.records / 1e6
            for with_transform in (False, True):
                transform = Qwen2AudioTransform(tokenizer_dir, max_seconds=clip_seconds,
                                                chunk_seconds=chunk_seconds) if with_transform else None
                for workers in (int(w) for w in args.workers.split(",")):
                    rate, first = examples_per_second(path, batch_size=args.batch_size, batches=args.batches,
                                                      workers=workers, transform=transform)
                    what = "decode + Qwen2-Audio transform" if with_transform else "decode (audio + frames)"
                    rows.append((preset, f"{mb_per_record:.3f}", what, workers, f"{rate:.1f}", f"{first:.1f}"))
                    results.append(dict(preset=preset, mb_per_record=mb_per_record, transform=with_transform,
                                        workers=workers, examples_per_s=rate, first_batch_s=first))
    print(f"pipeline throughput, batch {args.batch_size}, {args.batches} timed batches, {os.cpu_count()} CPUs")
    print_table(rows, ("preset", "MB/record", "pipeline", "workers", "examples/s", "first batch s"))
    best = max((r["examples_per_s"] for r in results if r["preset"] == "10s20f" and r["transform"]), default=None)
    headroom = []
    if best is not None:
        per_core = best / os.cpu_count()
        rows = []
        for name, needed in distill_consumption():
            headroom.append(dict(slice=name, needed_clips_per_s=needed, headroom=best / needed,
                                 cores_needed=needed / per_core))
            rows.append((name, f"{needed:.1f}", f"{best:.1f}", f"{best / needed:.2f}x", f"{needed / per_core:.0f}"))
        print(f"\nheadroom: 10s20f clips with the transform ({best:.1f}/s here, {os.cpu_count()} CPUs) vs the "
              "Qwen2-Audio-7B distill step at 50 % MFU (benchmarks/tpu_aot.py)")
        print_table(rows, ("slice", "step eats clips/s", "pipeline clips/s here", "headroom", "host cores needed"))
    append_result({"benchmark": "pipeline", "config": vars(args), "machine": machine(),
                   "versions": versions("grain", "av", "numpy"), "results": results, "headroom": headroom})


if __name__ == "__main__":
    main()
