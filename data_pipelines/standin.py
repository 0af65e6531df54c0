"""A VGGSound-shaped stand-in for rehearsing the paper run before downloading anything big.

    python -m data_pipelines.standin --out DIR [--seed 0] [--classes 12] [--train-per-class 4]
        [--test-per-class 2] [--omni] [--pann-widths tiny|full]
    python -m distill_jax.main --config=configs/paper.py:standin=DIR --workdir=WORKDIR

Writes, deterministically for the same arguments:
- `DIR/vggsound.csv`: the official format (headerless: YouTube id, start seconds, label, split),
  labels from VGGSound's real class list (`data_pipelines/vggsound_classes.txt`), quoted where they
  hold commas; the first four classes are two synonym pairs (dog barking / dog bow-wow, playing
  timpani / playing tympani), the rest drawn by the seed;
- `DIR/clips/<id>_<start:06d>.mp4`: h264 + AAC files with the real world's variety: aspect ratios
  16:9, 4:3, 9:16 and 1:1 at 240p to 720p; 24, 25, 29.97 and 30 fps; 2 to 10 s (half of them 10 s);
  16, 44.1 and 48 kHz audio, mono and stereo; one clip whose video ends seconds before its audio;
  and two faults: a file with no audio stream and a truncated file (the converter skips both, named);
- `DIR/checkpoints/`: tiny random Qwen2-Audio, Qwen2-VL (and with `--omni` Qwen2.5-Omni) Hugging Face
  checkpoints with the real Qwen2 tokenizer, token ids and vocabulary sizes
  (`distill_jax/standin_checkpoints.py`), and a PANN-format Cnn14 `.pth`;
- `DIR/standin.json`: every clip's shape, rate, channels, length and fault, and the paths above.

The clips' pictures and sounds are simple (a class colour and tone, a moving square, noise): the
models are random, so the rehearsal proves the path (install, mesh, memory, compiled programs,
skipped clips, `gs://`), not accuracy.
"""
from __future__ import annotations

import argparse
import csv
import fractions
import json
import os
import string
from collections.abc import Sequence

import av
import numpy as np

CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vggsound_classes.txt")
SYNONYM_PAIRS = (("dog barking", "dog bow-wow"), ("playing timpani", "playing tympani"))
# (width, height): YouTube's common shapes, every aspect ratio at least once in each run's first clips.
FRAME_SIZES = ((426, 240), (640, 360), (854, 480), (1280, 720),  # 16:9
               (320, 240), (480, 360), (640, 480),  # 4:3
               (360, 640), (240, 426),  # 9:16
               (360, 360), (480, 480))  # 1:1
FRAME_RATES = (fractions.Fraction(24), fractions.Fraction(25), fractions.Fraction(30000, 1001), fractions.Fraction(30))
SAMPLE_RATES = (16000, 44100, 48000)
FULL_SECONDS = 10


def vggsound_classes() -> list[str]:
    """VGGSound's 309 class names in alphabetical order, spelled as the official list spells them
    (its typo "eletric blender running" included); checked against the PyPI package vggsounder's
    classes.csv in tests/test_standin.py."""
    with open(CLASSES_FILE, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _clip_id(rng) -> tuple[str, int]:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(rng.choice(list(alphabet), 11)), int(rng.integers(0, 300))


def plan(*, seed: int = 0, num_classes: int = 12, train_per_class: int = 4, test_per_class: int = 2) -> dict:
    """What the stand-in holds: classes, and per clip its id, class, split, frame size, rate, length,
    audio rate and channels, and fault (None, "video_ends_early", "no_audio", "truncated")."""
    names = vggsound_classes()
    rng = np.random.default_rng(seed)
    paired = [c for pair in SYNONYM_PAIRS for c in pair]
    if num_classes < 10 + len(paired) // 2:
        raise ValueError(f"--classes {num_classes}: 10-way questions over classes with synonyms need at least "
                         f"{10 + len(paired) // 2}")
    rest = [c for c in names if c not in paired]
    classes = sorted(paired + [rest[i] for i in rng.choice(len(rest), num_classes - len(paired), replace=False)])
    clips = []
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label in classes:
            for _ in range(count):
                ytid, start = _clip_id(rng)
                k = len(clips)
                clips.append(dict(
                    ytid=ytid, start=start, label=label, split=split,
                    size=FRAME_SIZES[k % len(FRAME_SIZES)] if k < len(FRAME_SIZES) else
                    FRAME_SIZES[int(rng.integers(len(FRAME_SIZES)))],
                    fps=str(FRAME_RATES[int(rng.integers(len(FRAME_RATES)))]),
                    seconds=FULL_SECONDS if rng.random() < 0.5 else int(rng.integers(2, FULL_SECONDS)),
                    sample_rate=int(SAMPLE_RATES[int(rng.integers(len(SAMPLE_RATES)))]),
                    channels=int(rng.integers(1, 3)), fault=None))
    test = [c for c in clips if c["split"] == "test"]
    test[0].update(fault="video_ends_early", seconds=FULL_SECONDS)
    test[1]["fault"] = "no_audio"
    test[2]["fault"] = "truncated"
    return {"seed": seed, "classes": classes, "clips": clips}


def clip_name(clip: dict) -> str:
    return f"{clip['ytid']}_{clip['start']:06d}"


def _frames(clip: dict, index: int, count: int) -> np.ndarray:
    width, height = clip["size"]
    colour = np.asarray([(index * 53) % 256, (index * 97) % 256, (index * 31) % 256], np.uint8)
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = colour
    side = max(8, min(width, height) // 5)
    x = int((width - side) * (count % 50) / 50)
    frame[height // 3:height // 3 + side, x:x + side] = 255 - colour
    return frame


def write_clip(path: str, clip: dict, class_index: int, rng) -> None:
    """One mp4 as `clip` describes it (h264 yuv420p + AAC at its rate and channels)."""
    width, height = clip["size"]
    fps = fractions.Fraction(clip["fps"])
    video_seconds = clip["seconds"] - (4 if clip["fault"] == "video_ends_early" else 0)
    with av.open(path, "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "30"}
        stream = None
        if clip["fault"] != "no_audio":
            stream = container.add_stream("aac", rate=clip["sample_rate"])
            stream.layout = "stereo" if clip["channels"] == 2 else "mono"
        for k in range(int(video_seconds * fps)):
            container.mux(video.encode(av.VideoFrame.from_ndarray(_frames(clip, class_index, k), format="rgb24")))
        container.mux(video.encode(None))
        if stream is not None:
            rate = clip["sample_rate"]
            t = np.arange(int(clip["seconds"] * rate)) / rate
            tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * class_index) * t) + 0.05 * rng.standard_normal(t.size)
            pcm = np.round(np.clip(tone, -1, 1) * 32767).astype(np.int16)
            channels = np.stack([pcm] * clip["channels"], axis=1)  # interleaved [samples, channels]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels.reshape(1, -1)), format="s16",
                                               layout=stream.layout.name)
            frame.sample_rate, frame.pts, frame.time_base = rate, 0, fractions.Fraction(1, rate)
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    if clip["fault"] == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) * 2 // 5)


def write_csv(path: str, clips: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # quotes the labels that hold commas, as the official file does
        for clip in clips:
            writer.writerow([clip["ytid"], clip["start"], clip["label"], clip["split"]])


def build(out, *, seed: int = 0, num_classes: int = 12, train_per_class: int = 4, test_per_class: int = 2,
          omni: bool = False, pann_widths: str = "tiny") -> dict:
    """Writes the stand-in into `out` (see the module docstring); returns standin.json's content."""
    from distill_jax.standin_checkpoints import PANN_FILE, write_checkpoints, write_pann

    out = os.fspath(out)
    made = plan(seed=seed, num_classes=num_classes, train_per_class=train_per_class, test_per_class=test_per_class)
    clips_dir = os.path.join(out, "clips")
    os.makedirs(clips_dir, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    for clip in made["clips"]:
        path = os.path.join(clips_dir, clip_name(clip) + ".mp4")
        noise = np.random.default_rng(rng.integers(2**31))
        if not os.path.exists(path):
            write_clip(path + ".tmp.mp4", clip, made["classes"].index(clip["label"]), noise)
            os.replace(path + ".tmp.mp4", path)
    write_csv(os.path.join(out, "vggsound.csv"), made["clips"])
    models = ("qwen2_audio", "qwen2_vl") + (("qwen2_5_omni",) if omni else ())
    checkpoints = write_checkpoints(os.path.join(out, "checkpoints"), models=models, seed=seed)
    pann = os.path.join(out, "checkpoints", PANN_FILE if pann_widths == "tiny" else "Cnn14_16k_full_random.pth")
    if not os.path.exists(pann):
        write_pann(pann, widths=pann_widths, seed=seed)
    made.update(csv=os.path.join(out, "vggsound.csv"), clips_dir=clips_dir, checkpoints=checkpoints, pann=pann,
                analysis_size=len(made["classes"]))
    made["clips"] = [{**c, "size": list(c["size"])} for c in made["clips"]]
    with open(os.path.join(out, "standin.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(made, f, indent=1)
    os.replace(os.path.join(out, "standin.json.tmp"), os.path.join(out, "standin.json"))  # last: the stand-in is whole
    return made


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="draws the classes, shapes, rates and lengths")
    p.add_argument("--classes", type=int, default=12, help="classes (at least 12: two synonym pairs + 10-way)")
    p.add_argument("--train-per-class", type=int, default=4)
    p.add_argument("--test-per-class", type=int, default=2)
    p.add_argument("--omni", action="store_true", help="also a tiny Qwen2.5-Omni (the audio-visual reference)")
    p.add_argument("--pann-widths", choices=("tiny", "full"), default="tiny",
                   help="the Cnn14 .pth's widths: narrow, or Cnn14_16k's real 80 M parameters")
    args = p.parse_args(argv)
    made = build(args.out, seed=args.seed, num_classes=args.classes, train_per_class=args.train_per_class,
                 test_per_class=args.test_per_class, omni=args.omni, pann_widths=args.pann_widths)
    faults = [f"{clip_name(c)} ({c['fault']})" for c in made["clips"] if c["fault"]]
    print(f"stand-in: {len(made['clips'])} clips of {len(made['classes'])} VGGSound classes in {args.out} "
          f"(faults: {', '.join(faults)}); checkpoints: {', '.join(made['checkpoints'].values())}; {made['pann']}")
    return made


if __name__ == "__main__":
    main()
