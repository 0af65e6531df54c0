"""PANNs' Cnn14 (= `Cnn14` in panns-inference 0.1.1's models.py) in Flax NNX.

waveform [B, N] -> STFT power (periodic Hann window, reflect padding, = torchlibrosa
`Spectrogram`) -> librosa mel filters -> 10 log10(max(x, 1e-10)) (= `LogmelFilterBank`,
ref 1.0, no top_db) -> `bn0` over mel bins -> six conv blocks (3x3 conv-BN-ReLU twice,
2x2 average pooling; none after the last) -> mean over frequency -> max + mean over
time -> `fc1` + ReLU (the embedding) -> `fc_audioset` + sigmoid.

Layout is channels last: the log-mel is [B, time, mel, channels] (PyTorch: [B, C, time,
mel]). Module names equal PANN's state-dict keys (`conv_block3.bn2`, `fc_audioset`), so
`distill_jax.convert.load_pann` maps them one to one. The STFT is a matmul with the
windowed DFT basis (what torchlibrosa's `conv_real`/`conv_imag` hold), at full float32
precision on every backend: a bf16 STFT would wreck the low-energy bins' log.

Train mode (`model.train()`, the nnx default) applies SpecAugment (2 time stripes up to
64 frames, 2 mel stripes up to 8 bins), dropout (0.2 after each block, 0.5 around fc1)
and batch statistics in BatchNorm, updating the running statistics; `model.eval()`
uses the running statistics and no randomness. Mixup is left to the caller.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.layers.batch_norm import BatchNorm
from distill_jax.layers.linear import Linear, param
from distill_jax.sharding import constrain

NUM_BLOCKS = 6
TIME_POOLINGS = NUM_BLOCKS - 1  # blocks 1-5 halve time and mel; block 6 does not pool
AMIN = 1e-10  # power_to_db's floor; ref 1.0 (so no offset), top_db None
SMALL_MAP = 64  # wide layers on maps of at most this many positions convolve as a matmul (see Conv2d)


@dataclasses.dataclass(frozen=True)
class Cnn14Config:
    """Front end + widths of Cnn14 (= the constructor arguments of PANN's `Cnn14`)."""

    sample_rate: int = 32000
    window_size: int = 1024
    hop_size: int = 320
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 14000.0
    classes_num: int = 527
    channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)  # conv_block1..6 (fixed in PANN)
    embedding_dim: int = 2048  # fc1's width (fixed in PANN)
    spec_augment: bool = True  # in train mode, as PANN's Cnn14 (False = its Cnn14_no_specaug)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) != NUM_BLOCKS:
            raise ValueError(f"Cnn14 has {NUM_BLOCKS} conv blocks; channels={self.channels}")
        if self.mel_bins < 2 ** TIME_POOLINGS:
            raise ValueError(f"mel_bins={self.mel_bins} is below {2 ** TIME_POOLINGS}: five 2x2 poolings "
                             "would leave no frequency bins")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={self.fmin}, fmax={self.fmax}, "
                             f"sample_rate={self.sample_rate}")
        if self.window_size % 2 or self.hop_size < 1:
            raise ValueError(f"window_size must be even and hop_size >= 1, got {self.window_size}, {self.hop_size}")

    @property
    def min_samples(self) -> int:
        """Shortest clip the model takes: one window, and 32 frames for the five 2x time poolings."""
        return max(self.window_size, (2 ** TIME_POOLINGS - 1) * self.hop_size)

    def num_frames(self, num_samples: int) -> int:
        """STFT frames of a clip (centred, reflect-padded)."""
        return 1 + num_samples // self.hop_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cnn14Config":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Cnn14Config fields {sorted(unknown)}")
        return cls(**{**d, "channels": tuple(d.get("channels", cls.channels))})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Cnn14Config":
        """`cnn14_32k` (= Cnn14_mAP=0.431.pth), `cnn14_16k` (= Cnn14_16k_mAP=0.438.pth), or `tiny`
        (the 16 kHz front end with narrow blocks: CPU tests and the toy world)."""
        presets = {
            "cnn14_32k": dict(),
            "cnn14_16k": dict(sample_rate=16000, window_size=512, hop_size=160, fmax=8000.0),
            "tiny": dict(sample_rate=16000, window_size=512, hop_size=160, fmax=8000.0, classes_num=10,
                         channels=(8, 16, 32, 64, 64, 128), embedding_dim=64),
        }
        if name not in presets:
            raise ValueError(f"unknown Cnn14 preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


def default_rngs(seed: int = 0) -> nnx.Rngs:
    """Parameter init and dropout / SpecAugment streams on "rbg" keys: XLA:CPU compiles threefry's
    random bits slowly (measured on 2 cores: tiny Cnn14 init 12.7 s eager vs 4.4 s; a train step
    with dropout 31 s vs 13 s). Any nnx.Rngs works; this one is what the library itself uses."""
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"), dropout=jax.random.key(seed + 1, impl="rbg"))


@functools.lru_cache(maxsize=8)
def stft_basis(window_size: int) -> np.ndarray:
    """[window, 2 * (window // 2 + 1)] float32: Hann-windowed cos | -sin DFT rows (= conv_real | conv_imag)."""
    n = np.arange(window_size)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / window_size)  # periodic Hann (librosa get_window fftbins=True)
    k = np.arange(window_size // 2 + 1)
    angle = 2 * np.pi * ((n[:, None] * k[None, :]) % window_size) / window_size  # exact phase, no large arguments
    basis = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1) * window[:, None]
    basis = basis.astype(np.float32)
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=8)
def mel_filters(sample_rate: int, window_size: int, mel_bins: int, fmin: float, fmax: float) -> np.ndarray:
    """[window // 2 + 1, mel_bins] float32: librosa.filters.mel(...).T (= LogmelFilterBank.melW)."""
    import librosa

    mel = librosa.filters.mel(sr=sample_rate, n_fft=window_size, n_mels=mel_bins, fmin=fmin, fmax=fmax)
    mel = np.ascontiguousarray(mel.T.astype(np.float32))
    mel.setflags(write=False)
    return mel


def check_waveform(waveform, config: Cnn14Config, *, name: str = "waveform") -> None:
    """Raise a ValueError naming what is wrong with a [B, N] batch of clips (shape, length, NaN/inf).

    The finiteness check needs concrete values; under `jax.jit` only shapes are checked.
    """
    shape = np.shape(waveform)
    if len(shape) != 2:
        raise ValueError(f"{name} must be [batch, samples], got shape {shape}")
    if shape[1] < config.min_samples:
        raise ValueError(
            f"{name} clips have {shape[1]} samples ({shape[1] / config.sample_rate:.3f} s at "
            f"{config.sample_rate} Hz); Cnn14 needs at least {config.min_samples}: one "
            f"{config.window_size}-sample window and {2 ** TIME_POOLINGS} frames (hop {config.hop_size}) "
            "for its five time poolings")
    dtype = np.dtype(getattr(waveform, "dtype", np.float32))
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{name} must be floating-point samples, got dtype {dtype}")
    if not isinstance(waveform, jax.core.Tracer):
        check_finite(waveform, name=name)


def check_finite(waveform, *, name: str = "waveform") -> None:
    """Raise a ValueError naming the clips (rows) of a [B, N] batch that hold NaN or inf."""
    finite = np.isfinite(np.asarray(waveform))
    if not finite.all():
        clips = np.flatnonzero(~finite.reshape(finite.shape[0], -1).all(axis=1)).tolist()
        raise ValueError(f"{name} has {int((~finite).sum())} non-finite samples (NaN or inf) in clips {clips}")


class SpecAugmentation(nnx.Module):
    """= torchlibrosa SpecAugmentation: zero random stripes of frames and of mel bins (train mode only).

    Per clip and stripe: width ~ U{0..drop_width-1}, start ~ U{0..size-width-1} (torch.randint).
    """

    def __init__(self, *, time_drop_width: int = 64, time_stripes_num: int = 2, freq_drop_width: int = 8,
                 freq_stripes_num: int = 2, rngs: nnx.Rngs):
        self.time = (time_drop_width, time_stripes_num)
        self.freq = (freq_drop_width, freq_stripes_num)
        self.deterministic = False
        self.rngs = rngs["dropout"].fork()

    @staticmethod
    def _keep(key, batch: int, size: int, drop_width: int, stripes: int) -> jax.Array:
        k_width, k_start = jax.random.split(key)
        width = jax.random.randint(k_width, (batch, stripes), 0, drop_width)
        start = jax.random.randint(k_start, (batch, stripes), 0, jnp.maximum(size - width, 1))
        pos = jnp.arange(size)[None, None, :]
        dropped = (pos >= start[..., None]) & (pos < (start + width)[..., None])
        return ~jnp.any(dropped, axis=1)  # [batch, size]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, time, mel] -> the same with stripes zeroed."""
        if self.deterministic:
            return x
        b, t, f = x.shape
        keep_t = self._keep(self.rngs(), b, t, *self.time)
        keep_f = self._keep(self.rngs(), b, f, *self.freq)
        return x * (keep_t[:, :, None] & keep_f[:, None, :]).astype(x.dtype)


class Conv2d(nnx.Module):
    """= torch.nn.Conv2d(kernel 3x3, stride 1, padding 1, bias=False) on channels-last input."""

    def __init__(self, in_channels: int, out_channels: int, config: Cnn14Config, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(config.dtype)
        self.kernel = param(nnx.initializers.xavier_uniform(), rngs.params(), (3, 3, in_channels, out_channels),
                            jnp.dtype(config.param_dtype), ("conv_height", "conv_width", "conv_in", "conv_out"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        b, h, w, c = x.shape
        if h * w <= SMALL_MAP and c >= 256:
            # As one matmul over the 9 shifted copies (im2col): XLA:CPU's convolution runs at ~1-3 GFLOP/s
            # on maps of a few positions with >= 256 channels (2 s for block 6 of two 1 s clips); the
            # matmul takes ms. Narrower layers keep the convolution (cheaper to compile).
            padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            patches = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
            return jnp.dot(patches.reshape(b * h * w, 9 * c), kernel.reshape(9 * c, -1)).reshape(b, h, w, -1)
        return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvBlock(nnx.Module):
    """= ConvBlock: (3x3 conv without bias -> BatchNorm -> ReLU) x 2, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int, config: Cnn14Config, *, rngs: nnx.Rngs):
        pd = jnp.dtype(config.param_dtype)
        self.conv1 = Conv2d(in_channels, out_channels, config, rngs=rngs)
        self.conv2 = Conv2d(out_channels, out_channels, config, rngs=rngs)
        self.bn1 = BatchNorm(out_channels, param_dtype=pd, rngs=rngs)
        self.bn2 = BatchNorm(out_channels, param_dtype=pd, rngs=rngs)

    def __call__(self, x: jax.Array, pool: bool) -> jax.Array:
        """[B, time, mel, C_in] -> [B, time // 2, mel // 2, C_out] (or unpooled)."""
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        if pool:  # = F.avg_pool2d(kernel 2): an odd trailing row/column is dropped
            b, t, f, c = x.shape
            x = x[:, : t // 2 * 2, : f // 2 * 2].reshape(b, t // 2, 2, f // 2, 2, c).mean(axis=(2, 4))
        return constrain(x, ("batch", "length", None, None))


class Cnn14(nnx.Module):
    """`model(waveform [B, N] float32) -> {"clipwise_output" [B, classes], "embedding" [B, embedding_dim]}`."""

    def __init__(self, config: Cnn14Config, *, rngs: nnx.Rngs):
        self.config = config
        pd, dt = jnp.dtype(config.param_dtype), jnp.dtype(config.dtype)
        self.spec_augmenter = SpecAugmentation(rngs=rngs) if config.spec_augment else None
        self.bn0 = BatchNorm(config.mel_bins, param_dtype=pd, rngs=rngs)
        in_channels = 1
        for i, out_channels in enumerate(config.channels):
            setattr(self, f"conv_block{i + 1}", ConvBlock(in_channels, out_channels, config, rngs=rngs))
            in_channels = out_channels
        init = nnx.initializers.xavier_uniform()
        self.fc1 = Linear(in_channels, config.embedding_dim, axes=("channels", "cnn_embed"), use_bias=True,
                          kernel_init=init, dtype=dt, param_dtype=pd, rngs=rngs)
        self.fc_audioset = Linear(config.embedding_dim, config.classes_num, axes=("cnn_embed", "classes"),
                                  use_bias=True, kernel_init=init, dtype=dt, param_dtype=pd, rngs=rngs)
        self.block_dropout = nnx.Dropout(0.2, rngs=rngs)
        self.fc_dropout = nnx.Dropout(0.5, rngs=rngs)

    def blocks(self) -> list[ConvBlock]:
        return [getattr(self, f"conv_block{i + 1}") for i in range(NUM_BLOCKS)]

    def log_mel(self, waveform: jax.Array) -> jax.Array:
        """[B, N] -> [B, frames, mel_bins] log-mel in dB (= spectrogram_extractor + logmel_extractor)."""
        c = self.config
        x = jnp.asarray(waveform, jnp.float32)
        half = c.window_size // 2
        x = jnp.pad(x, ((0, 0), (half, half)), mode="reflect")  # center=True, pad_mode="reflect"
        frames = c.num_frames(waveform.shape[1])
        index = np.arange(frames)[:, None] * c.hop_size + np.arange(c.window_size)[None, :]
        spec = jnp.dot(x[:, index], stft_basis(c.window_size), precision=jax.lax.Precision.HIGHEST)
        bins = c.window_size // 2 + 1
        power = jnp.square(spec[..., :bins]) + jnp.square(spec[..., bins:])
        mel = jnp.dot(power, mel_filters(c.sample_rate, c.window_size, c.mel_bins, c.fmin, c.fmax),
                      precision=jax.lax.Precision.HIGHEST)
        return 10.0 * jnp.log10(jnp.maximum(mel, AMIN))

    def __call__(self, waveform: jax.Array) -> dict[str, jax.Array]:
        check_waveform(waveform, self.config)
        x = self.bn0(self.log_mel(waveform))  # = bn0 on the mel axis (PANN transposes it into channels)
        if self.spec_augmenter is not None:
            x = self.spec_augmenter(x)
        x = constrain(x[..., None].astype(jnp.dtype(self.config.dtype)), ("batch", "length", None, None))
        for i, block in enumerate(self.blocks()):
            x = self.block_dropout(block(x, pool=i < TIME_POOLINGS))
        x = jnp.mean(x, axis=2)  # over frequency -> [B, time, C]
        x = jnp.max(x, axis=1) + jnp.mean(x, axis=1)  # over time -> [B, C]
        x = self.fc_dropout(x)
        x = jax.nn.relu(self.fc1(x))
        embedding = self.fc_dropout(x)
        clipwise = jax.nn.sigmoid(self.fc_audioset(x).astype(jnp.float32))  # PANN: from x, not the dropped-out copy
        return {"clipwise_output": clipwise, "embedding": embedding.astype(jnp.float32)}
