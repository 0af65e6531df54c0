"""Audio/video containers and JPEG frames with PyAV (FFmpeg), NumPy in and out.

`decode_clip` turns one mp4 (or any container FFmpeg reads) into what a record stores: mono
16 kHz int16 PCM and RGB frames sampled at a fixed rate, resized so the short side is at most
a given size. What goes wrong is a `ClipError` whose `kind` is one of `SKIP_KINDS`, so the
converters can skip the clip and report why. `encode_jpeg` / `decode_jpeg` use FFmpeg's
MJPEG codec (baseline JPEG, full-range YUV 4:2:0), so no image library is needed.
`write_mp4` makes real container files (toy world, tests).
"""
from __future__ import annotations

import fractions
import math
import os
import threading

import av
import numpy as np

SAMPLE_RATE = 16000
SKIP_KINDS = ("missing file", "no audio stream", "no video stream", "decode error", "too short", "non-finite audio")

_FLOAT_SAMPLES = ("flt", "fltp", "dbl", "dblp")  # decoded sample formats that can hold NaN
_codecs = threading.local()  # this thread's MJPEG encoders (one per frame shape) and decoder


class ClipError(Exception):
    """A clip that cannot be converted; `kind` is one of SKIP_KINDS."""

    def __init__(self, kind: str, detail: str):
        assert kind in SKIP_KINDS, kind
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def resized_shape(height: int, width: int, max_short_side: int) -> tuple[int, int]:
    """(height, width) scaled down so the short side is at most `max_short_side` (never up)."""
    short = min(height, width)
    if short <= max_short_side:
        return height, width
    scale = max_short_side / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def encode_jpeg(rgb: np.ndarray, *, quality: int = 3) -> bytes:
    """JPEG bytes of an RGB uint8 [H, W, 3] image; `quality` is FFmpeg's qscale (2 best .. 31)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_jpeg needs an RGB uint8 [H, W, 3] image, got {rgb.dtype} {rgb.shape}")
    return _encode_jpeg_frame(av.VideoFrame.from_ndarray(rgb, format="rgb24"), quality)


def _encode_jpeg_frame(frame: av.VideoFrame, quality: int) -> bytes:
    key = f"mjpeg-w-{frame.width}x{frame.height}-q{quality}"
    encoder = getattr(_codecs, key, None)
    if encoder is None:  # opening an encoder costs ~10x encoding a small frame: keep one per shape
        ctx = av.CodecContext.create("mjpeg", "w")
        ctx.width, ctx.height = frame.width, frame.height
        ctx.pix_fmt = "yuvj420p"
        ctx.time_base = fractions.Fraction(1, 1)
        ctx.options = {"qmin": str(quality), "qmax": str(quality)}
        encoder = [ctx, 0]  # the context and the next pts it accepts
        setattr(_codecs, key, encoder)
    frame = frame.reformat(format="yuvj420p")
    frame.pts, frame.time_base = encoder[1], fractions.Fraction(1, 1)
    encoder[1] += 1
    packets = encoder[0].encode(frame)  # MJPEG is intra-only: one packet (one JPEG) per frame, no delay
    if len(packets) != 1:
        raise RuntimeError(f"the MJPEG encoder returned {len(packets)} packets for one frame")
    return bytes(packets[0])


def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 [H, W, 3] of JPEG bytes; ValueError if they are not one decodable image."""
    ctx = getattr(_codecs, "mjpeg-r", None)
    if ctx is None:
        ctx = av.CodecContext.create("mjpeg", "r")
        setattr(_codecs, "mjpeg-r", ctx)
    try:
        frames = ctx.decode(av.Packet(data))
    except av.error.FFmpegError as e:
        raise ValueError(f"undecodable JPEG ({len(data)} bytes): {e}") from e
    if len(frames) != 1:
        raise ValueError(f"JPEG data ({len(data)} bytes) decoded to {len(frames)} images, expected 1")
    return frames[0].to_ndarray(format="rgb24")


def write_mp4(path, frames: np.ndarray, fps: float, audio: np.ndarray | None = None, *,
              sample_rate: int = SAMPLE_RATE, video_codec: str = "mpeg4", video_bitrate: int | None = None,
              container_format: str | None = None) -> None:
    """An mp4 of RGB uint8 frames [T, H, W, 3] (H, W even) and optional mono audio in [-1, 1] (AAC).

    `container_format` ("mp4") is needed when the file name does not end in .mp4.
    Audio frames carry timestamps, so the AAC encoder's priming delay is recorded in the
    file and a decoder returns the samples aligned with the video.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    with av.open(os.fspath(path), "w", format=container_format) as container:
        video = container.add_stream(video_codec, rate=fractions.Fraction(fps).limit_denominator(1000))
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        if video_bitrate is not None:
            video.bit_rate = video_bitrate
        if audio is not None:  # every stream must exist before the first packet is muxed
            stream = container.add_stream("aac", rate=sample_rate)
            stream.layout = "mono"
        for image in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode(None))
        if audio is not None:
            pcm = np.round(np.clip(np.asarray(audio, np.float64), -1.0, 1.0) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sample_rate, 0, fractions.Fraction(1, sample_rate)
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))


def _stream_end(stream) -> float | None:
    if stream.duration is None:
        return None
    return float(((stream.start_time or 0) + stream.duration) * stream.time_base)


class _FrameSampler:
    """Picks the frame on screen at each time start + k / fps and JPEG-encodes it, resized."""

    def __init__(self, start: float, end: float, fps: float, max_short_side: int, quality: int):
        self.targets = [start + k / fps for k in range(max(1, math.floor((end - start) * fps + 1e-6)))]
        self.max_short_side, self.quality = max_short_side, quality
        self.jpegs: list[bytes] = []
        self._previous = None

    def _emit(self, frame) -> None:
        height, width = resized_shape(frame.height, frame.width, self.max_short_side)
        resized = frame.reformat(width=width, height=height, format="rgb24")
        self.jpegs.append(_encode_jpeg_frame(resized, self.quality))

    def add(self, frame) -> None:
        time = frame.time
        while len(self.jpegs) < len(self.targets) and time > self.targets[len(self.jpegs)] + 1e-6:
            if self._previous is None:  # the first frame starts after the target time
                break
            self._emit(self._previous)
        self._previous = frame

    def finish(self, video_end: float) -> None:
        while (self._previous is not None and len(self.jpegs) < len(self.targets)
               and self.targets[len(self.jpegs)] < video_end - 1e-6):
            self._emit(self._previous)


def decode_clip(path, *, start_sec: float = 0.0, max_seconds: float = 10.0, fps: float = 2.0,
                max_short_side: int = 448, min_seconds: float = 1.0, jpeg_quality: int = 3
                ) -> tuple[np.ndarray, list[bytes]]:
    """Mono 16 kHz int16 PCM and JPEG frames of `[start_sec, start_sec + max_seconds)` of a file.

    Frames are the ones on screen at start_sec + k / fps (k = 0, 1, ...), resized so the short
    side is at most `max_short_side`. The clip is as long as its shorter stream allows; under
    `min_seconds` of audio, or no frame, is "too short".

    Raises:
        ClipError: kind "missing file", "no audio stream", "no video stream", "decode error"
            (FFmpeg could not open or decode it), "too short" or "non-finite audio" (NaN or
            infinite samples in a float audio stream: never written as a clip).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ClipError("missing file", path)
    end_sec = start_sec + max_seconds
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ClipError("no video stream", path)
            if not container.streams.audio:
                raise ClipError("no audio stream", path)
            video, audio = container.streams.video[0], container.streams.audio[0]
            if start_sec > 0:
                container.seek(int(start_sec * av.time_base), backward=True)
            sampler = _FrameSampler(start_sec, end_sec, fps, max_short_side, jpeg_quality)
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            chunks, audio_start = [], None
            video_last = -math.inf
            past_end = {"video": False, "audio": False}
            for packet in container.demux(video, audio):
                kind = packet.stream.type
                for frame in packet.decode():
                    if frame.time is None:
                        continue
                    if frame.time >= end_sec:
                        past_end[kind] = True
                    elif kind == "video":
                        sampler.add(frame)
                        video_last = max(video_last, frame.time)
                    else:
                        if audio_start is None:
                            audio_start = frame.time
                        if frame.format.name in _FLOAT_SAMPLES and not np.isfinite(frame.to_ndarray()).all():
                            raise ClipError("non-finite audio", f"{path}: NaN or infinite samples at "
                                                                f"{frame.time:.3f} s")
                        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
                if all(past_end.values()):  # the rest of a long video is not needed
                    break
            if audio_start is not None:
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
            video_end = min(end_sec, video_last + 1.0 / float(video.average_rate or fps))
            if (stream_end := _stream_end(video)) is not None:
                video_end = min(video_end, stream_end)
            sampler.finish(video_end)
            audio_end = min(end_sec, _stream_end(audio) or end_sec)
    except av.error.FFmpegError as e:
        raise ClipError("decode error", f"{path}: {e}") from e
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    if audio_start is not None:
        first = round((start_sec - audio_start) * SAMPLE_RATE)
        last = max(first, round((audio_end - audio_start) * SAMPLE_RATE))
        if first < 0:  # audio starts after start_sec: keep it aligned with the frames
            pcm, last, first = np.concatenate([np.zeros(-first, np.int16), pcm]), last - first, 0
        pcm = pcm[first:last]
    if pcm.size < min_seconds * SAMPLE_RATE:
        raise ClipError("too short", f"{path}: {pcm.size / SAMPLE_RATE:.3f} s of audio, "
                                     f"under the {min_seconds:g} s minimum")
    if not sampler.jpegs:
        raise ClipError("too short", f"{path}: no video frame in [{start_sec:g}, {end_sec:g}) s")
    return pcm.astype(np.int16, copy=False), sampler.jpegs
