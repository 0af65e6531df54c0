"""data_pipelines.audio against transformers' WhisperFeatureExtractor, as Qwen2AudioProcessor uses it.

The reference runs the extractor's torch path (torch is installed); one test
also forces its NumPy path, which our float64 spectrum matches far tighter.
"""
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor
from transformers.models.whisper import feature_extraction_whisper

from data_pipelines import audio

SR = 16000
SECONDS = [0.5, 3.3, 10.0, 30.0]
# Real frames and Qwen2-Audio tokens per clip length, worked out by hand from the formulas.
EXPECTED_FRAMES = {0.5: 50, 3.3: 330, 10.0: 1000, 30.0: 3000}
EXPECTED_TOKENS = {0.5: 12, 3.3: 82, 10.0: 250, 30.0: 750}
TOL = 1e-4  # the extractor's torch path computes in float32; we measured <= ~5e-5


@pytest.fixture(scope="module")
def extractor():
    return WhisperFeatureExtractor(feature_size=128, sampling_rate=SR, hop_length=160, chunk_length=30, n_fft=400)


def hf_features(extractor, clips):
    """The extractor called exactly as Qwen2AudioProcessor._process_audio calls it."""
    out = extractor(clips, sampling_rate=SR, return_attention_mask=True, padding="max_length", return_tensors="np")
    return out["input_features"], out["attention_mask"]


def noise(seconds, seed=0):
    return np.random.default_rng(seed).normal(0.0, 0.1, int(round(seconds * SR))).astype(np.float32)


def sweep(seconds):
    """Linear chirp 100 Hz -> 7.5 kHz: tonal content with deep spectral valleys."""
    t = np.arange(int(round(seconds * SR))) / SR
    f0, f1 = 100.0, 7500.0
    return 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * seconds)))  # float64, like a decoder gives


SIGNALS = {"noise": noise, "sweep": sweep}


@pytest.mark.parametrize("seconds", SECONDS)
@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_matches_whisper_feature_extractor(extractor, signal, seconds):
    clip = SIGNALS[signal](seconds)
    features, mask = audio.log_mel_features(clip)
    ref_features, ref_mask = hf_features(extractor, clip)

    assert features.shape == (audio.N_MELS, audio.MAX_FRAMES) and features.dtype == np.float32
    assert mask.shape == (audio.MAX_FRAMES,) and mask.dtype == np.int32
    diff = np.abs(features - ref_features[0]).max()
    assert diff <= TOL, f"{signal} {seconds} s: max |diff| {diff:.3e}"
    np.testing.assert_array_equal(mask, ref_mask[0])
    assert int(mask.sum()) == audio.num_audio_frames(clip.size) == EXPECTED_FRAMES[seconds]
    assert audio.num_audio_tokens(int(mask.sum())) == EXPECTED_TOKENS[seconds]


def test_batch_matches_qwen2_audio_processor(extractor):
    """Two clips of different lengths through the processor's own audio step."""
    clips = [sweep(3.3), noise(10.0, seed=1)]
    # Qwen2AudioProcessor._process_audio needs only these attributes; a stub avoids loading a tokenizer.
    stub = SimpleNamespace(feature_extractor=extractor, audio_token="<|AUDIO|>")
    stub.replace_audio_token = lambda inputs, audio_idx: Qwen2AudioProcessor.replace_audio_token(stub, inputs,
                                                                                              audio_idx)
    ref, replacements = Qwen2AudioProcessor._process_audio(stub, clips, sampling_rate=SR, return_tensors="np")

    features, masks = audio.batch_log_mel_features(clips)
    assert features.shape == (2, audio.N_MELS, audio.MAX_FRAMES) and masks.shape == (2, audio.MAX_FRAMES)
    assert np.abs(features - ref["input_features"]).max() <= TOL
    np.testing.assert_array_equal(masks, ref["feature_attention_mask"])
    tokens = [audio.num_audio_tokens(audio.num_audio_frames(c.size)) for c in clips]
    assert tokens == list(ref["num_audio_tokens"]) == [82, 250]
    assert [r.count("<|AUDIO|>") for r in replacements] == tokens
    # The batched call equals one call per clip (each clip is clamped against its own maximum).
    for clip, batched in zip(clips, features):
        np.testing.assert_array_equal(audio.log_mel_features(clip)[0], batched)


def test_matches_numpy_path_tightly(extractor, monkeypatch):
    """The extractor's NumPy path (float64 spectrum, as ours) agrees to float32 rounding."""
    clip = sweep(3.3)
    monkeypatch.setattr(feature_extraction_whisper, "is_torch_available", lambda: False)
    ref_features, ref_mask = hf_features(extractor, clip)
    features, mask = audio.log_mel_features(clip)
    assert np.abs(features - ref_features[0]).max() <= 1e-6
    np.testing.assert_array_equal(mask, ref_mask[0])


def test_mel_filter_bank_matches_transformers(extractor):
    bank = audio.mel_filter_bank(SR, audio.N_FFT, audio.N_MELS)
    np.testing.assert_allclose(bank, extractor.mel_filters.T, rtol=1e-12, atol=1e-15)
    assert audio.mel_filter_bank(SR, audio.N_FFT, audio.N_MELS) is bank  # cached
    assert not bank.flags.writeable


def test_truncate_cuts_like_the_extractor(extractor):
    clip = noise(31.0, seed=2)
    features, mask = audio.log_mel_features(clip, truncate=True)
    ref_features, ref_mask = hf_features(extractor, clip)  # the extractor truncates silently
    assert np.abs(features - ref_features[0]).max() <= TOL
    np.testing.assert_array_equal(mask, ref_mask[0])
    assert audio.num_audio_frames(clip.size) == audio.MAX_FRAMES


@pytest.mark.parametrize("num_samples, frames", [(1, 1), (159, 1), (160, 1), (161, 2), (16000, 100), (480000, 3000)])
def test_num_audio_frames_is_the_mask_sum(num_samples, frames):
    clip = np.full(num_samples, 0.1, np.float32)
    assert audio.num_audio_frames(num_samples) == frames == int(audio.log_mel_features(clip)[1].sum())


def test_num_audio_tokens_formula():
    # (((l - 1) // 2 + 1) - 2) // 2 + 1, from processing_qwen2_audio.py
    assert [audio.num_audio_tokens(n) for n in (1, 2, 3, 4, 5, 7, 1000, 3000)] == [0, 0, 1, 1, 1, 2, 250, 750]


@pytest.mark.parametrize("clip, kwargs, match", [
    (np.zeros(0, np.float32), {}, r"empty \(0 samples\)"),
    (np.zeros(30 * SR + 1, np.float32), {}, r"30\.000 s .*longer than the 30 s limit.*truncate=True"),
    (np.zeros(5 * SR, np.float32), {"max_seconds": 4.0}, r"5\.000 s .*longer than the 4 s limit"),
    (np.zeros((2, SR), np.float32), {}, r"1-D mono waveform, got shape \(2, 16000\)"),
    (np.zeros((), np.float32), {}, r"1-D mono waveform, got shape \(\)"),
    (np.zeros(SR, np.float32), {"sample_rate": 44100}, r"44100 Hz.*must resample to 16 kHz"),
    (np.array([0.0, np.nan, 0.1], np.float32), {}, r"1 non-finite samples \(NaN or inf\)"),
    (np.array([0.0, np.inf, -np.inf]), {}, r"2 non-finite samples"),
    (np.zeros(SR, np.complex64), {}, r"real-valued"),
])
def test_bad_input_is_a_clear_error(clip, kwargs, match):
    with pytest.raises(ValueError, match=match):
        audio.log_mel_features(clip, **kwargs)


def test_batch_bad_input():
    with pytest.raises(ValueError, match="at least one clip"):
        audio.batch_log_mel_features([])
    with pytest.raises(ValueError, match="must resample to 16 kHz"):
        audio.batch_log_mel_features([noise(1.0)], sample_rate=8000)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        audio.num_audio_frames(0)


@pytest.mark.parametrize("seconds", [10.0, 7.3, 0.5])
def test_short_window_is_the_padded_chunk_cut(extractor, seconds):
    """No 30 s of padding for a 10 s clip: the 1008-frame window equals the first 1008 frames of
    the processor's 30 s features (exactly: the clamp's maximum is the same), mask included."""
    rng = np.random.RandomState(3)
    clip = (0.1 * rng.randn(int(seconds * audio.SAMPLE_RATE))).astype(np.float32)
    frames = audio.window_frames(10.0)
    assert frames == 1008  # 1000 real frames + the 2 the tower reads after them, rounded up to 8
    short, short_mask = audio.log_mel_features(clip, num_frames=frames)
    full = extractor(clip, sampling_rate=16000, return_tensors="np", return_attention_mask=True,
                     padding="max_length")
    reference, _ = audio.log_mel_features(clip)
    assert short.shape == (128, frames)
    np.testing.assert_array_equal(short, reference[:, :frames])
    np.testing.assert_allclose(short, full["input_features"][0][:, :frames], atol=1e-4)
    np.testing.assert_array_equal(short_mask, full["attention_mask"][0][:frames])


def test_short_window_refuses_a_clip_it_cannot_hold():
    assert audio.window_frames(2.0, chunk_seconds=2.0) == 200  # never beyond the chunk
    with pytest.raises(ValueError, match="does not fit a window of 1008 frames"):
        audio.log_mel_features(np.zeros(int(10.07 * 16000), np.float32), num_frames=1008)
