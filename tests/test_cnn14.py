"""Cnn14 pieces against their PyTorch counterparts: BatchNorm (train and eval), the log-mel
front end (= torchlibrosa), SpecAugment, config presets, sharding metadata, bad input.

Whole-model parity is tests/parity/test_cnn14_parity.py; train mode end to end (running
statistics updated, dropout) is exercised by tests/test_switch.py's full fine-tune."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from distill_jax import sharding
from distill_jax.layers.batch_norm import BatchNorm
from distill_jax.models.cnn14 import Cnn14, Cnn14Config, SpecAugmentation, default_rngs, mel_filters, stft_basis


def test_batch_norm_matches_torch_in_train_and_eval_mode():
    rng = np.random.RandomState(0)
    x = (3.0 + 2.0 * rng.randn(4, 5, 6, 7)).astype(np.float32)  # [B, H, W, C]
    ref = torch.nn.BatchNorm2d(7)
    ours = BatchNorm(7, rngs=nnx.Rngs(0))
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(rng.rand(7) + 0.5, dtype=torch.float32))
        ref.bias.copy_(torch.tensor(rng.randn(7), dtype=torch.float32))
    ours.scale[...] = ref.weight.detach().numpy()
    ours.bias[...] = ref.bias.detach().numpy()
    to_torch = lambda a: torch.tensor(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    for step in range(2):  # train mode: batch statistics, running statistics updated (twice)
        ref.train()
        y_ref = ref(to_torch(x + step)).detach().numpy().transpose(0, 2, 3, 1)
        y = np.asarray(ours(x + step))
        np.testing.assert_allclose(y, y_ref, atol=2e-5)
        np.testing.assert_allclose(np.asarray(ours.mean[...]), ref.running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours.var[...]), ref.running_var.numpy(), atol=1e-5)
    ref.eval()
    ours.eval()
    before = np.asarray(ours.mean[...]).copy()
    z = 0.5 * x  # eval mode: running statistics, left unchanged
    np.testing.assert_allclose(np.asarray(ours(z)), ref(to_torch(z)).detach().numpy().transpose(0, 2, 3, 1),
                               atol=2e-5)
    np.testing.assert_array_equal(np.asarray(ours.mean[...]), before)


def _torchlibrosa_log_mel(config, waveform):
    from torchlibrosa.stft import LogmelFilterBank, Spectrogram

    spec = Spectrogram(n_fft=config.window_size, hop_length=config.hop_size, win_length=config.window_size,
                       window="hann", center=True, pad_mode="reflect", freeze_parameters=True)
    logmel = LogmelFilterBank(sr=config.sample_rate, n_fft=config.window_size, n_mels=config.mel_bins,
                              fmin=config.fmin, fmax=config.fmax, ref=1.0, amin=1e-10, top_db=None,
                              freeze_parameters=True)
    with torch.no_grad():
        return logmel(spec(torch.tensor(waveform)))[:, 0].numpy(), spec, logmel


@pytest.mark.parametrize("preset", ["cnn14_32k", "cnn14_16k"])
def test_log_mel_matches_torchlibrosa(preset):
    config = Cnn14Config.preset(preset)
    rng = np.random.RandomState(1)
    waveform = (0.1 * rng.randn(2, config.sample_rate // 2 + 123)).astype(np.float32)
    ref, spec, logmel = _torchlibrosa_log_mel(config, waveform)
    bins = config.window_size // 2 + 1
    # The constants are torchlibrosa's (float32 roundings of the same float64 numbers).
    np.testing.assert_allclose(stft_basis(config.window_size)[:, :bins].T,
                               spec.stft.conv_real.weight[:, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(stft_basis(config.window_size)[:, bins:].T,
                               spec.stft.conv_imag.weight[:, 0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(mel_filters(config.sample_rate, config.window_size, config.mel_bins,
                                              config.fmin, config.fmax), logmel.melW.numpy())
    model = nnx.eval_shape(lambda: Cnn14(config, rngs=nnx.Rngs(0)))
    ours = np.asarray(model.log_mel(waveform))
    assert ours.shape == ref.shape == (2, config.num_frames(waveform.shape[1]), 64)
    # dB, values in ~[-28, 0.4]; float32 sums in another order. Measured: max 1.4e-5, median 1.4e-6.
    assert np.abs(ours - ref).max() < 1e-4 and np.median(np.abs(ours - ref)) < 1e-5


def test_spec_augmentation_zeroes_bounded_stripes():
    aug = SpecAugmentation(rngs=default_rngs(0))
    x = np.ones((8, 300, 64), np.float32)
    y = np.asarray(aug(x))
    for clip in y:
        dropped_frames = np.flatnonzero((clip == 0).all(axis=1))
        dropped_bins = np.flatnonzero((clip == 0).all(axis=0))
        assert len(dropped_frames) <= 2 * 63 and len(dropped_bins) <= 2 * 7
        assert np.array_equal(clip == 0, np.isin(np.arange(300), dropped_frames)[:, None]
                              | np.isin(np.arange(64), dropped_bins)[None, :])
    assert (y == 0).any()
    assert not np.array_equal(y, np.asarray(aug(x)))  # a fresh mask per call
    aug.eval()
    np.testing.assert_array_equal(np.asarray(aug(x)), x)


def test_presets_and_full_size_shapes():
    with pytest.raises(ValueError, match="unknown Cnn14 preset 'big'"):
        Cnn14Config.preset("big")
    with pytest.raises(ValueError, match="6 conv blocks"):
        Cnn14Config(channels=(64, 128))
    c32, c16 = Cnn14Config.preset("cnn14_32k"), Cnn14Config.preset("cnn14_16k")
    assert (c32.sample_rate, c32.window_size, c32.hop_size, c32.fmin, c32.fmax) == (32000, 1024, 320, 50.0, 14000.0)
    assert (c16.sample_rate, c16.window_size, c16.hop_size, c16.fmin, c16.fmax) == (16000, 512, 160, 50.0, 8000.0)
    assert Cnn14Config.from_dict(c16.to_dict()) == c16
    model = nnx.eval_shape(lambda: Cnn14(c32, rngs=nnx.Rngs(0)))
    out = jax.eval_shape(lambda x: Cnn14(c32, rngs=nnx.Rngs(0))(x), jax.ShapeDtypeStruct((2, 320000), np.float32))
    assert out["clipwise_output"].shape == (2, 527) and out["embedding"].shape == (2, 2048)
    params = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    widths = (1, 64, 128, 256, 512, 1024, 2048)
    convs = sum(9 * i * o + 9 * o * o + 2 * 2 * o for i, o in zip(widths, widths[1:]))  # 2 convs, 2 BNs
    assert params == 2 * 64 + convs + (2048 * 2048 + 2048) + (2048 * 527 + 527)  # bn0, blocks, fc1, fc_audioset


def test_every_variable_has_a_sharding_rule():
    model = nnx.eval_shape(lambda: Cnn14(Cnn14Config.preset("tiny"), rngs=nnx.Rngs(0)))
    specs = sharding.param_partition_specs(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))) == 4 + 6 * 10 + 4


def test_bad_input_is_named():
    config = Cnn14Config.preset("tiny")
    model = nnx.eval_shape(lambda: Cnn14(config, rngs=nnx.Rngs(0)))
    x = np.zeros((3, 8000), np.float32)
    x[1, 10] = np.nan
    x[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite samples \(NaN or inf\) in clips \[1, 2\]"):
        model(x)
    with pytest.raises(ValueError, match=r"have 400 samples .* at least 4960: one 512-sample window"):
        model(np.zeros((1, 400), np.float32))  # shorter than one window
    with pytest.raises(ValueError, match=r"have 4000 samples .* 32 frames \(hop 160\)"):
        model(np.zeros((1, 4000), np.float32))  # longer than a window, too few frames for 5 poolings
    with pytest.raises(ValueError, match=r"must be \[batch, samples\], got shape \(8000,\)"):
        model(np.zeros(8000, np.float32))
    with pytest.raises(ValueError, match="floating-point samples, got dtype int16"):
        model(np.zeros((1, 8000), np.int16))
