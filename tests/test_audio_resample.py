"""NumPy resampling vs librosa.resample(res_type="polyphase"), and how far that is from soxr_hq."""
import librosa
import numpy as np
import pytest

from data_pipelines.audio_resample import num_resampled, resample

RATES = [(16000, 32000), (32000, 16000), (44100, 16000), (16000, 44100), (48000, 32000), (22050, 16000),
         (8000, 16000)]
FLOAT32_TOLERANCE = 1e-6  # scipy filters float32 audio in float32; we filter in float64 and round once
FLOAT64_TOLERANCE = 1e-12


@pytest.mark.parametrize("orig_sr,target_sr", RATES)
def test_equals_librosa_polyphase(orig_sr, target_sr):
    rng = np.random.RandomState(orig_sr + target_sr)
    for n in (1, 7, 1000, 3 * orig_sr + 17):
        y = rng.uniform(-1, 1, n).astype(np.float32)
        ref = librosa.resample(y, orig_sr=orig_sr, target_sr=target_sr, res_type="polyphase")
        ours = resample(y, orig_sr, target_sr)
        assert ours.shape == ref.shape == (num_resampled(n, orig_sr, target_sr),) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= FLOAT32_TOLERANCE
        y64 = y.astype(np.float64)
        ref64 = librosa.resample(y64, orig_sr=orig_sr, target_sr=target_sr, res_type="polyphase")
        assert np.abs(resample(y64, orig_sr, target_sr) - ref64).max() <= FLOAT64_TOLERANCE


def test_batches_resample_row_by_row_and_equal_rates_copy():
    y = np.random.RandomState(0).randn(3, 4000).astype(np.float32)
    batch = resample(y, 16000, 32000)
    assert batch.shape == (3, 8000)
    for row, out in zip(y, batch):
        np.testing.assert_array_equal(out, resample(row, 16000, 32000))
    same = resample(y, 16000, 16000)
    np.testing.assert_array_equal(same, y)
    assert same is not y
    assert resample(np.zeros(100, np.int16), 8000, 16000).dtype == np.float32


def test_distance_from_soxr_hq_on_band_limited_audio():
    """Not an equality: the chosen quality is "polyphase". Against librosa's default soxr_hq, 16 -> 32 kHz,
    20 sines below 6 kHz (0.75 of the input Nyquist): < 1e-3 away from the first and last 400 output
    samples (measured 5.6e-4 - 8.0e-4 over 5 seeds), < 1e-2 at the ends (the zero padding). Nearer
    Nyquist polyphase's Kaiser(5) filter rolls off earlier than soxr's: up to 1.4e-2 at 7 kHz."""
    rng = np.random.RandomState(0)
    t = np.arange(32000) / 16000
    f, phase = rng.uniform(50, 6000, 20), rng.uniform(0, 2 * np.pi, 20)
    y = (np.sin(2 * np.pi * f[:, None] * t + phase[:, None]).mean(0)).astype(np.float32)
    soxr = librosa.resample(y, orig_sr=16000, target_sr=32000, res_type="soxr_hq")
    diff = np.abs(resample(y, 16000, 32000) - soxr)
    assert diff[400:-400].max() < 1e-3 and diff.max() < 1e-2


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"orig_sr must be a positive whole number of Hz, got 16000.5"):
        resample(np.zeros(10), 16000.5, 32000)
    with pytest.raises(ValueError, match=r"target_sr must be a positive whole number of Hz, got 0"):
        resample(np.zeros(10), 16000, 0)
    with pytest.raises(ValueError, match=r"audio is empty"):
        resample(np.zeros(0), 16000, 32000)
    with pytest.raises(ValueError, match=r"2 non-finite samples \(NaN or inf\) out of 10"):
        resample(np.array([0, np.nan, 0, 0, np.inf, 0, 0, 0, 0, 0], np.float32), 16000, 32000)
    with pytest.raises(ValueError, match="real-valued samples, got dtype complex64"):
        resample(np.zeros(10, np.complex64), 16000, 32000)
