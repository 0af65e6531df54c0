"""Qwen2-Audio / Whisper log-mel front end in pure NumPy.

Equals transformers' `WhisperFeatureExtractor(feature_size=128, sampling_rate=16000,
hop_length=160, chunk_length=30, n_fft=400)` called the way `Qwen2AudioProcessor`
calls it (`return_attention_mask=True, padding="max_length"`), so the audio
encoder sees the features it was trained on. It is NumPy only (no JAX, torch or
transformers) so that Grain data-loader worker processes can run it.

Per clip: cast to float32, zero-pad to `max_seconds` (30 s = 480000 samples),
STFT (periodic Hann window 400, hop 160, centred with reflect padding), power
spectrum without the last frame, slaney mel filters 0-8000 Hz, log10 floored at
1e-10, clamp to (clip max - 8), then (x + 4) / 4. The frame mask is the sample
mask taken every `HOP_LENGTH` samples.

The spectrum is computed in float64, like the extractor's NumPy path (which it
matches to ~1e-7); the extractor's torch path (used when torch is installed)
works in float32 and differs from both by up to ~5e-5.
"""
from __future__ import annotations

import functools
import math

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
MAX_SECONDS = 30
MAX_FRAMES = MAX_SECONDS * SAMPLE_RATE // HOP_LENGTH  # 3000

_MEL_FMAX = 8000.0  # the extractor's fixed upper edge, whatever the sample rate
_LOG_FLOOR = 1e-10
_DYNAMIC_RANGE = 8.0  # log10 units kept below each clip's maximum


def _hz_to_mel(freq):
    """Slaney mel scale: linear below 1 kHz, logarithmic above (as transformers.audio_utils)."""
    freq = np.asarray(freq, np.float64)
    logstep = 27.0 / np.log(6.4)
    log_part = 15.0 + np.log(np.maximum(freq, 1000.0) / 1000.0) * logstep
    return np.where(freq >= 1000.0, log_part, 3.0 * freq / 200.0)


def _mel_to_hz(mels):
    """Inverse of `_hz_to_mel`."""
    mels = np.asarray(mels, np.float64)
    logstep = np.log(6.4) / 27.0
    log_part = 1000.0 * np.exp(logstep * (np.maximum(mels, 15.0) - 15.0))
    return np.where(mels >= 15.0, log_part, 200.0 * mels / 3.0)


@functools.lru_cache(maxsize=8)
def mel_filter_bank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Slaney-normalised slaney-scale mel filters [n_mels, n_fft // 2 + 1], float64, read-only.

    Same numbers as `transformers.audio_utils.mel_filter_bank(..., norm="slaney",
    mel_scale="slaney")` (transposed). Cached, since every clip uses the same bank.
    """
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(_MEL_FMAX), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    widths = np.diff(hz_points)
    slopes = hz_points[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (hz_points[2:] - hz_points[:-2])  # equal area per band
    filters = np.ascontiguousarray(filters.T)
    filters.setflags(write=False)
    return filters


@functools.lru_cache(maxsize=1)
def _hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window / the extractor's window_function)."""
    window = np.hanning(n_fft + 1)[:-1]
    window.setflags(write=False)
    return window


def _max_samples(sample_rate: int, max_seconds: float) -> int:
    return int(round(max_seconds * sample_rate))


def _check_clip(waveform, sample_rate: int, max_seconds: float, truncate: bool) -> np.ndarray:
    """The clip as float32 1-D, or a ValueError saying what is wrong with it."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"sample_rate is {sample_rate} Hz but the Whisper/Qwen2-Audio front end needs "
                         f"{SAMPLE_RATE} Hz audio: the pipeline must resample to 16 kHz first")
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise ValueError(f"audio must be a 1-D mono waveform, got shape {waveform.shape}"
                         " (mix stereo down to mono first)")
    if not (np.issubdtype(waveform.dtype, np.floating) or np.issubdtype(waveform.dtype, np.integer)):
        raise ValueError(f"audio must be real-valued samples, got dtype {waveform.dtype}")
    if waveform.size == 0:
        raise ValueError("audio is empty (0 samples)")
    # The extractor rounds to float32 before anything else; so do we.
    waveform = waveform.astype(np.float32, copy=False)
    if not np.all(np.isfinite(waveform)):
        bad = int(np.count_nonzero(~np.isfinite(waveform)))
        raise ValueError(f"audio has {bad} non-finite samples (NaN or inf) out of {waveform.size}")
    max_samples = _max_samples(sample_rate, max_seconds)
    if waveform.size > max_samples:
        if not truncate:
            raise ValueError(f"audio is {waveform.size / sample_rate:.3f} s ({waveform.size} samples), longer than "
                             f"the {max_seconds:g} s limit ({max_samples} samples); cut it into shorter clips "
                             "or pass truncate=True to keep only the first part")
        waveform = waveform[:max_samples]
    return waveform


def num_audio_frames(num_samples: int, *, max_seconds: float = MAX_SECONDS) -> int:
    """Real (unpadded) mel frames of a clip of `num_samples` samples at 16 kHz.

    This is the sum of the frame mask: one frame per started hop. Clips longer
    than `max_seconds` count as cut to it (as `truncate=True` does).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    max_frames = _max_samples(SAMPLE_RATE, max_seconds) // HOP_LENGTH
    return min(math.ceil(num_samples / HOP_LENGTH), max_frames)


def num_audio_tokens(num_frames: int) -> int:
    """Audio tokens Qwen2-Audio's encoder emits for `num_frames` real frames.

    The processor's formula (a stride-2 conv, then a stride-2 pool), used by the
    prompt builder to expand <|AUDIO|>: 1000 frames (10 s) -> 250, 3000 -> 750.
    Clips of at most 2 frames (320 samples) give 0 tokens.
    """
    return (((num_frames - 1) // 2 + 1) - 2) // 2 + 1


FRAMES_PER_TOKEN = 4  # mel frames per audio token: a stride-2 conv, then a stride-2 pool


def short_window(real_frames: int, *, multiple: int = 8, max_frames: int = MAX_FRAMES) -> int:
    """The smallest window (a multiple of `multiple`) over which the audio tower gives the padded
    chunk's embeddings: every real frame plus the two after it, which the last real position of
    the stride-2 conv reads (F = (L - 1) // 2 + 1 outputs read frames up to 2F <= L + 1)."""
    if multiple % FRAMES_PER_TOKEN:
        raise ValueError(f"multiple must be a multiple of {FRAMES_PER_TOKEN}, got {multiple}")
    return min(max_frames, -(-(real_frames + 2) // multiple) * multiple)


def window_frames(clip_seconds: float, *, chunk_seconds: float = MAX_SECONDS, multiple: int = 8) -> int:
    """`short_window` of clips of at most `clip_seconds`, within the chunk they are padded to."""
    chunk_frames = _max_samples(SAMPLE_RATE, chunk_seconds) // HOP_LENGTH
    real = num_audio_frames(_max_samples(SAMPLE_RATE, clip_seconds), max_seconds=chunk_seconds)
    return short_window(real, multiple=multiple, max_frames=chunk_frames)


def log_mel_features(waveform: np.ndarray, *, sample_rate: int = SAMPLE_RATE, n_mels: int = N_MELS,
                     max_seconds: float = MAX_SECONDS, truncate: bool = False,
                     num_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features of one mono clip, padded to `max_seconds` (or the first `num_frames` of them).

    Args:
        waveform: 1-D samples at 16 kHz, nominally in [-1, 1].
        sample_rate: must be 16000; anything else is an error (resample first).
        n_mels: mel bins (128 for Qwen2-Audio / Whisper large-v3, 80 for older Whispers).
        max_seconds: length every clip is zero-padded to (the extractor's chunk_length).
        truncate: cut clips longer than `max_seconds` (what the extractor does
            silently); by default they are an error, so that audio is not lost unnoticed.
        num_frames: keep only the first `num_frames` frames of the padded features, computed
            without the rest (`window_frames`: no 30 s of padding for a 10 s clip). They are
            exactly the padded path's: the frames after the clip are silence, whose log-mel is
            the floor, so the clamp's maximum is the same. The clip must end 2 frames before.

    Returns:
        `(input_features [n_mels, T] float32, feature_attention_mask [T] int32)`,
        T = num_frames if given, else max_seconds * 16000 // 160 (3000 for 30 s); the mask
        is 1 on real frames.

    Raises:
        ValueError: wrong sample rate, not 1-D, empty, non-finite samples, or too long.
    """
    waveform = _check_clip(waveform, sample_rate, max_seconds, truncate)
    max_samples = _max_samples(sample_rate, max_seconds)
    chunk_frames = max_samples // HOP_LENGTH  # the STFT's last frame is dropped
    if num_frames is None or num_frames >= chunk_frames:
        num_frames = chunk_frames
    else:
        if math.ceil(waveform.size / HOP_LENGTH) + 2 > num_frames:
            raise ValueError(f"audio is {waveform.size / sample_rate:.3f} s ({waveform.size} samples): it does not "
                             f"fit a window of {num_frames} frames ({num_frames * HOP_LENGTH / sample_rate:g} s "
                             "less 2 frames); cut it or raise the window")
        max_samples = num_frames * HOP_LENGTH + N_FFT  # every kept frame sees the same zeros as the chunk

    padded = np.zeros(max_samples, np.float64)
    padded[:waveform.size] = waveform
    padded = np.pad(padded, N_FFT // 2, mode="reflect")  # center=True
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:num_frames]
    spectrum = np.fft.rfft(frames * _hann_window(N_FFT), axis=-1)
    power = spectrum.real ** 2 + spectrum.imag ** 2  # [T, n_fft // 2 + 1]

    mel = mel_filter_bank(sample_rate, N_FFT, n_mels) @ power.T  # [n_mels, T]
    log_spec = np.log10(np.maximum(mel, _LOG_FLOOR)).astype(np.float32)
    # Clamp against this clip's own maximum (over the padding too, as the extractor does).
    log_spec = np.maximum(log_spec, log_spec.max() - np.float32(_DYNAMIC_RANGE))
    features = (log_spec + np.float32(4.0)) / np.float32(4.0)

    mask = (np.arange(num_frames) * HOP_LENGTH < waveform.size).astype(np.int32)
    return features, mask


def batch_log_mel_features(waveforms: list[np.ndarray], **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """`log_mel_features` of each clip, stacked: ([B, n_mels, T] float32, [B, T] int32).

    Clips are independent: the extractor pads every clip to the same fixed
    length and clamps each against its own maximum, so its batched call gives
    the same numbers as one call per clip.
    """
    if len(waveforms) == 0:
        raise ValueError("batch_log_mel_features needs at least one clip, got none")
    features, masks = zip(*(log_mel_features(w, **kwargs) for w in waveforms))
    return np.stack(features), np.stack(masks)
