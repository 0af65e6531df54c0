"""Qwen2-Audio log-mel features of a 10 s clip: ours (30 s, and the short window a 10 s clip
fills) vs transformers' WhisperFeatureExtractor, its NumPy path (what runs without torch) and,
when torch is installed, its torch path. The README's "Why hand-written" cites this table.

    python benchmarks/log_mel.py [--seconds=10] [--calls=20]

Prints a table (median ms per clip, largest difference from the extractor's NumPy path) and
appends a JSON line to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from common import append_result, machine, median_ms, print_table, time_steps, versions  # noqa: E402
from data_pipelines import audio  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    from transformers import WhisperFeatureExtractor

    samples = int(args.seconds * audio.SAMPLE_RATE)
    clip = (0.1 * np.random.default_rng(0).standard_normal(samples)).astype(np.float32)
    extractor = WhisperFeatureExtractor(feature_size=audio.N_MELS, sampling_rate=audio.SAMPLE_RATE,
                                        hop_length=audio.HOP_LENGTH, chunk_length=audio.MAX_SECONDS, n_fft=audio.N_FFT)
    padded = np.zeros((1, audio.MAX_SECONDS * audio.SAMPLE_RATE), np.float32)
    padded[0, :samples] = clip
    window = audio.window_frames(args.seconds, chunk_seconds=audio.MAX_SECONDS)
    ways = {
        "HF WhisperFeatureExtractor, NumPy path (30 s)": lambda: extractor._np_extract_fbank_features(padded, "cpu")[0],
        "ours, 30 s": lambda: audio.log_mel_features(clip, sample_rate=audio.SAMPLE_RATE,
                                                     max_seconds=audio.MAX_SECONDS)[0],
        f"ours, {window}-frame window": lambda: audio.log_mel_features(
            clip, sample_rate=audio.SAMPLE_RATE, max_seconds=audio.MAX_SECONDS, num_frames=window)[0],
    }
    try:
        import torch  # noqa: F401

        ways["HF WhisperFeatureExtractor, torch path (30 s)"] = \
            lambda: extractor._torch_extract_fbank_features(padded, "cpu")[0]
    except ImportError:
        pass
    reference = ways["HF WhisperFeatureExtractor, NumPy path (30 s)"]()
    rows, record = [], {"benchmark": "log_mel", "seconds": args.seconds, "machine": machine(),
                        "versions": versions("numpy", "transformers"), "ms": {}, "max_abs_diff": {}}
    for name, way in ways.items():
        features = way()
        diff = float(np.abs(features - reference[:, :features.shape[1]]).max())
        ms = median_ms(time_steps(way, warmup=1, steps=args.calls))
        rows.append((name, features.shape[1], f"{ms:.1f}", f"{diff:.2g}"))
        record["ms"][name], record["max_abs_diff"][name] = ms, diff
    print_table(rows, ("features", "frames", "ms per clip", "max |diff| vs HF NumPy"))
    append_result(record)


if __name__ == "__main__":
    main()
