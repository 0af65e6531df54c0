"""The toy world: a procedural audio-visual dataset whose per-class modality strengths are set
by construction, written as real mp4 files + a VGGSound-format CSV (the seen classes' splits) and
AudioSet-format evaluation files (the unseen classes' clips).

    python -m data_pipelines.toy_world --out DIR            # mp4s + CSVs, then TFRecords in DIR/tfrecords
    python -m data_pipelines.toy_world --out DIR --no-convert

It is shaped like the paper's analysis set: the visual model is clearly stronger overall
(paper: Qwen2-VL 88.5 %, Qwen2-Audio 71.9 %), the audio model wins a minority of classes, some
classes are clear in both, and most of the audio model's weakness is *learnable from its own
input*: the information is in the sound, the model lacks the mapping (as distillation lifting
Qwen2-Audio to 92.6 % shows for the real models). A model's weakness on a class has one of two
causes, both written into `design.json`:

- **Sensory limit** (a hard pair): the two classes share one modality's generator and every
  setting of it but one parameter, HARD_RATIO = 1.2 times larger in one class (sound: its pitch;
  picture: the object's size), jittered per clip log-uniformly by exp(U(-0.2, 0.2)) in both, so
  the per-clip ranges overlap: even an ideal classifier of that modality is right on at most
  0.5 + ln(1.2) / (4 * 0.2) = 73 % of the pair's clips. No teacher can lift a student past this.
- **Unlearned mapping** (a scrambled group): the classes sound clearly different, but the audio
  model's pretraining labels (the warm start's targets: `PRETRAIN_SCRAMBLED`,
  `distill_jax.stages.warm_start.pretrain_letters`) are drawn at random
  within the group, once per clip, as if its captions never told them apart. Its frozen tower
  hears the difference; its language model never learned which name goes with which sound. A
  teacher's answers on the training split can teach it.

Designed reliability (~X: the hard-pair partner in that modality; {..}: scrambled together in
the audio model's pretraining; sizes relative to a radius of 0.2 frame):

    class                    designed group                 audio                          visual
    chainsaw                 visual wins, audio unlearned   engine buzz, f0 150 Hz {A}     orange triangle, left-right
    lawn mowing              visual wins, audio unlearned   engine buzz, f0 75 Hz {B}      green square, up-down
    waterfall burbling       visual wins, audio unlearned   band noise, centre 1200 Hz {A} blue bar, falling
    wind noise               visual wins, audio unlearned   band noise, centre 3200 Hz {B} white circle, drifting
    driving motorcycle       visual wins, audio unlearned   slow revving sweep 120-280 Hz {B} red circle, circling
    race car, auto racing    visual wins, audio unlearned   fast revving sweep 250-600 Hz {A} yellow bar, left-right fast
    police car (siren)       visual wins, audio limit       siren sweep 700-1500 Hz ~ambul. blue square, blinking red
    ambulance siren         visual wins, audio limit       siren sweep 840-1800 Hz ~police white bar, blinking red
    playing violin, fiddle   audio wins, visual limit       bowed harmonics, 660 Hz        brown bar, size 0.91 ~cello
    playing cello            audio wins, visual limit       bowed harmonics, 130 Hz        brown bar, size 1.10 ~violin
    dog barking              audio wins, visual limit       bright noise bursts, 3/s       tan circle, up-down, 0.91 ~growl.
    dog growling             audio wins, visual limit       low noise, 25 Hz throb         tan circle, up-down, 1.10 ~bark.
    people coughing          audio wins, visual limit       low noise bursts, 1.2/s        skin ring, pulsing, 0.91 ~whistl.
    people whistling         audio wins, visual limit       pure whistle, 1800 Hz          skin ring, pulsing, 1.10 ~cough.
    church bell ringing      both clear                     inharmonic bell strikes        gold ring, swinging
    clock tick               both clear                     clicks, 2/s                    cyan cross, static
    -- unseen (never in train/analysis/test: only in "unseen", and in "pretrain" to warm-start) --
    cat meowing              visual wins, audio unlearned   meow, 700<->450 Hz {C}         purple circle, pulsing
    baby crying              visual wins, audio unlearned   wail, 420 Hz, 3 Hz throb {C}   pink square, static
    frog croaking            audio wins, visual limit       pulsed 300 Hz croaks           green triangle, hopping, 0.91 ~owl
    owl hooting              audio wins, visual limit       low hoots, 2 per second        green triangle, hopping, 1.10 ~frog

So the warm-started audio model is near chance within groups A and B (it answers one class of
each) and near the Bayes bound on the sirens, the visual model near its bound on the six "audio
wins" classes (the paper's audio wins are human and temporal sounds: coughing, whistling):
about 70 % vs 85 % overall, near the paper's 72 / 88 (measured in the report, never assumed).
Ideal gated distillation of the audio student would reach about 90 %, above its teacher: near
the teacher on the unlearned classes, no better on the sirens (the sensory limit: no switch can
help there) and unchanged on its own strong classes. "Unseen" holds both kinds (a scrambled
pair and a visual-limit pair). Per clip: the other parameters jitter by 5-15 % (rate, pitch of
the unpaired sounds, size, position, colour, speed), noise is added to the sound (random SNR) and the picture, and with some
probability a faint sound or a small object of another class is mixed in, so small models
learn the classes well but not perfectly. `design.json` records per class its signatures, its
designed group, per modality its hard-pair partner with the parameter ratio, how they differ and
the pair's Bayes accuracy, the classes it is scrambled with in pretraining, and the generator
settings.

Splits (clips per class by default): pretrain 16 for every class, the 4 unseen ones included (to
warm-start the toy models, which should know every class, as the pretrained LLMs know AudioSet's:
"unseen" means never seen during distillation), train 32, analysis 24 (the switch's training
set) and test 40 for the 16 seen classes, and unseen 40 for each unseen class: 40 clips a class
resolve a 3-point difference over the 640 test clips. Everything is seeded per clip: the same
arguments give the same files.

The unseen clips take the path a real run's AudioSet clips take (`data_pipelines.audioset`):
`audioset/eval_segments.csv` names them by made-up MIDs ("/t/toy16", ...), `audioset/ontology.json`
maps every class's MID to its name and `audioset/keep.tsv` keeps the four unseen ones; they are
converted into their own manifest, `toy_world_unseen.manifest.json` (split "eval"), which the
study reads as its "unseen" split (`config.data.unseen`).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from data_pipelines import media

SAMPLE_RATE = media.SAMPLE_RATE
SEEN_SPLITS = ("pretrain", "train", "analysis", "test")
UNSEEN_SPLIT = "unseen"


@dataclasses.dataclass(frozen=True)
class Sound:
    family: str  # harmonic | am | sweep | band_noise | bursts | clicks | growl | bell | hoots | croaks | rumble
    params: tuple = ()
    # 0: every parameter jitters independently by a factor in [0.95, 1.05]. > 0: the family's frequency
    # parameters (PITCH_PARAMS) instead share one per-clip factor exp(U(-spread, spread)).
    spread: float = 0.0


@dataclasses.dataclass(frozen=True)
class Look:
    shape: str  # circle | square | triangle | ring | bar | cross
    colour: tuple[int, int, int]
    motion: str  # static | horizontal | vertical | circular | falling | pulse | blink | swing | hop | flash
    speed: float = 1.0  # cycles per second of the motion
    scale: float = 1.0  # size relative to the default object (radius 0.2 of the frame)
    # 0: the size jitters by a factor in [0.85, 1.15]. > 0: by a factor exp(U(-spread, spread)).
    spread: float = 0.0


@dataclasses.dataclass(frozen=True)
class ToyClass:
    name: str
    group: str  # "visual wins" | "audio wins" | "both clear"
    sound: Sound
    look: Look
    unseen: bool = False


# The parameters of each sound family, and its frequency parameters: the ones a Sound's `spread` scales together.
PARAM_NAMES = {"harmonic": ("f0 Hz", "harmonics", "decay"), "am": ("f0 Hz", "harmonics", "modulation Hz"),
               "sweep": ("from Hz", "to Hz", "sweeps per s", "harmonics"),
               "band_noise": ("centre Hz", "bandwidth Hz"), "bursts": ("per s", "centre Hz", "bandwidth Hz"),
               "clicks": ("per s", "centre Hz"), "growl": ("centre Hz", "throb Hz"), "bell": ("f0 Hz", "interval s"),
               "hoots": ("f0 Hz", "per s"), "croaks": ("f0 Hz", "per s"), "rumble": ("centre Hz",)}
PITCH_PARAMS = {"harmonic": (0,), "am": (0,), "sweep": (0, 1), "band_noise": (0,), "bursts": (1,), "clicks": (1,),
                "growl": (0,), "bell": (0,), "hoots": (0,), "croaks": (0,), "rumble": (0,)}

# A hard pair: the two classes share a generator in one modality, except that one parameter (the
# sound's frequencies, the object's size) is HARD_RATIO times larger in one of them, and it jitters
# per clip log-uniformly by +-HARD_SPREAD in both. The two per-clip ranges overlap, so even an
# ideal classifier of that modality is right on at most 0.5 + ln(HARD_RATIO) / (4 HARD_SPREAD)
# = 0.73 of the pair's clips (pair_bayes_accuracy), while the other modality tells them apart.
HARD_RATIO = 1.2
HARD_SPREAD = 0.2
_SMALL, _BIG = HARD_RATIO ** -0.5, HARD_RATIO ** 0.5  # object sizes of a hard pair (ratio HARD_RATIO)


def _higher(sound: Sound) -> Sound:
    """`sound` with its frequency parameters HARD_RATIO times higher."""
    params = tuple(round(v * HARD_RATIO, 6) if i in PITCH_PARAMS[sound.family] else v
                   for i, v in enumerate(sound.params))
    return dataclasses.replace(sound, params=params)


_SIREN = Sound("sweep", (700.0, 1500.0, 0.5, 2), HARD_SPREAD)  # from Hz, to Hz (and back), sweeps per s, harmonics
_BAR = Look("bar", (120, 70, 30), "static", spread=HARD_SPREAD)
_CIRCLE = Look("circle", (200, 160, 110), "vertical", 1.5, spread=HARD_SPREAD)
_HOPPER = Look("triangle", (70, 140, 60), "hop", 1.5, spread=HARD_SPREAD)
_FACE = Look("ring", (230, 170, 140), "pulse", 1.0, spread=HARD_SPREAD)

CLASSES = (
    ToyClass("chainsaw", "visual wins", Sound("am", (150.0, 6, 22.0)), Look("triangle", (240, 130, 20), "horizontal", 1.0)),
    ToyClass("lawn mowing", "visual wins", Sound("am", (75.0, 6, 9.0)), Look("square", (40, 180, 40), "vertical", 0.8)),
    ToyClass("waterfall burbling", "visual wins", Sound("band_noise", (1200.0, 900.0)),
             Look("bar", (40, 90, 230), "falling", 1.2)),
    ToyClass("wind noise", "visual wins", Sound("band_noise", (3200.0, 1500.0)),
             Look("circle", (235, 235, 235), "horizontal", 0.3)),
    ToyClass("driving motorcycle", "visual wins", Sound("sweep", (120.0, 280.0, 0.8, 4)),
             Look("circle", (220, 30, 30), "circular", 1.0)),
    ToyClass("race car, auto racing", "visual wins", Sound("sweep", (250.0, 600.0, 2.0, 5)),
             Look("bar", (240, 220, 30), "horizontal", 2.0)),
    ToyClass("police car (siren)", "visual wins", _SIREN, Look("square", (30, 60, 240), "blink", 2.0)),
    ToyClass("ambulance siren", "visual wins", _higher(_SIREN), Look("bar", (235, 235, 235), "blink", 1.2)),
    ToyClass("playing violin, fiddle", "audio wins", Sound("harmonic", (660.0, 8, 0.7)),
             dataclasses.replace(_BAR, scale=_SMALL)),
    ToyClass("playing cello", "audio wins", Sound("harmonic", (130.0, 8, 0.8)),
             dataclasses.replace(_BAR, scale=_BIG)),
    ToyClass("dog barking", "audio wins", Sound("bursts", (3.0, 1500.0, 1200.0)),
             dataclasses.replace(_CIRCLE, scale=_SMALL)),
    ToyClass("dog growling", "audio wins", Sound("growl", (300.0, 25.0)), dataclasses.replace(_CIRCLE, scale=_BIG)),
    ToyClass("people coughing", "audio wins", Sound("bursts", (1.2, 600.0, 900.0)),
             dataclasses.replace(_FACE, scale=_SMALL)),
    ToyClass("people whistling", "audio wins", Sound("harmonic", (1800.0, 2, 0.2)),
             dataclasses.replace(_FACE, scale=_BIG)),
    ToyClass("church bell ringing", "both clear", Sound("bell", (520.0, 1.0)),
             Look("ring", (230, 190, 50), "swing", 0.6)),
    ToyClass("clock tick", "both clear", Sound("clicks", (2.0, 3000.0)), Look("cross", (40, 220, 230), "static")),
    ToyClass("cat meowing", "visual wins", Sound("sweep", (700.0, 450.0, 0.6, 5)),
             Look("circle", (150, 60, 200), "pulse", 1.0), unseen=True),
    ToyClass("baby crying", "visual wins", Sound("am", (420.0, 4, 3.0)), Look("square", (250, 170, 190), "static"),
             unseen=True),
    ToyClass("frog croaking", "audio wins", Sound("croaks", (300.0, 3.0)), dataclasses.replace(_HOPPER, scale=_SMALL),
             unseen=True),
    ToyClass("owl hooting", "audio wins", Sound("hoots", (400.0, 2.0)), dataclasses.replace(_HOPPER, scale=_BIG),
             unseen=True),
)

# Scrambled groups: per modality, classes whose labels that modality's model never learned to tell
# apart in pretraining (the warm start draws each pretraining clip's target at random within its
# group, once per clip: distill_jax.stages.warm_start.pretrain_letters). The clips differ clearly in that modality.
PRETRAIN_SCRAMBLED = {
    "audio": (("chainsaw", "waterfall burbling", "race car, auto racing"),
              ("lawn mowing", "wind noise", "driving motorcycle"),
              ("cat meowing", "baby crying")),
    "visual": (),
}


def scrambled_with(name: str, modality: str) -> tuple[str, ...]:
    """The group of classes `name` is scrambled with in `modality`'s pretraining (itself included), or ()."""
    for group in PRETRAIN_SCRAMBLED[modality]:
        if name in group:
            return group
    return ()


def designed_group(toy: ToyClass) -> str:
    """The class's group with the cause of the weaker modality's weakness: "visual wins, audio
    unlearned" (learnable from the sound), "... audio limit" (a sensory limit), "audio wins,
    visual limit", "both clear"."""
    if toy.group == "both clear":
        return toy.group
    weak = "audio" if toy.group == "visual wins" else "visual"
    cause = "unlearned" if scrambled_with(toy.name, weak) else "limit"
    return f"{toy.group}, {weak} {cause}"


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Size and noise of the toy world. `per_class` counts clips of each seen class per split."""
    seed: int = 0
    seconds: float = 2.0
    size: int = 64  # frame height = width
    video_fps: int = 8
    per_class: tuple[tuple[str, int], ...] = (("pretrain", 16), ("train", 32), ("analysis", 24), ("test", 40))
    unseen_per_class: int = 40
    snr_db: tuple[float, float] = (0.0, 15.0)  # per-clip range of the sound's SNR against white noise
    image_noise: float = 12.0  # std of the per-pixel picture noise (0..255 scale)
    distractor_prob: float = 0.4  # chance of a faint sound / small object of another class

    def __post_init__(self):
        if self.seconds <= 0 or self.size < 16 or self.size % 2 or self.video_fps < 1:
            raise ValueError(f"need seconds > 0, an even size >= 16 and video_fps >= 1: {self}")
        if not 0 <= self.distractor_prob <= 1:
            raise ValueError(f"distractor_prob must be in [0, 1], got {self.distractor_prob}")


# ---------------------------------------------------------------------------------------------
# Sound
# ---------------------------------------------------------------------------------------------

def _band_noise(rng, n: int, centre: float, width: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spectrum *= np.exp(-0.5 * ((freqs - centre) / (width / 2.0)) ** 2)
    return np.fft.irfft(spectrum, n)


def _harmonics(phase: np.ndarray, count: int, decay: float) -> np.ndarray:
    return sum(decay ** k * np.sin((k + 1) * phase) for k in range(count))


def _pulse_train(rng, n: int, rate: float, width: float) -> np.ndarray:
    """An envelope of Gaussian pulses at `rate` per second with jittered onsets."""
    t = np.arange(n) / SAMPLE_RATE
    env = np.zeros(n)
    onset = rng.uniform(0, 1.0 / rate)
    while onset < t[-1]:
        env += np.exp(-0.5 * ((t - onset) / width) ** 2)
        onset += rng.uniform(0.85, 1.15) / rate
    return env


def render_sound(sound: Sound, rng: np.random.Generator, n: int) -> np.ndarray:
    """One jittered instance of `sound`, `n` samples at 16 kHz, unit RMS."""
    t = np.arange(n) / SAMPLE_RATE
    p = sound.params
    shift = np.exp(rng.uniform(-sound.spread, sound.spread)) if sound.spread else None

    def q(i: int) -> float:
        """Parameter i of this clip: jittered by a factor in [0.95, 1.05], or scaled by the shared `shift`."""
        if shift is not None and i in PITCH_PARAMS[sound.family]:
            return p[i] * shift
        return p[i] * rng.uniform(0.95, 1.05)

    if sound.family == "harmonic":
        f0, count, decay = q(0), p[1], p[2]
        vibrato = 0.004 * np.sin(2 * np.pi * 5.5 * t)
        x = _harmonics(2 * np.pi * f0 * np.cumsum(1 + vibrato) / SAMPLE_RATE, count, decay)
    elif sound.family == "am":
        f0, count, rate = q(0), p[1], q(2)
        x = _harmonics(2 * np.pi * f0 * t, count, 0.8) * (1 + 0.8 * np.sin(2 * np.pi * rate * t))
    elif sound.family == "sweep":
        low, high, rate, count = q(0), q(1), q(2), p[3]
        freq = low + (high - low) * (0.5 - 0.5 * np.cos(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
        x = _harmonics(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE, count, 0.6)
    elif sound.family == "band_noise":
        x = _band_noise(rng, n, q(0), q(1))
    elif sound.family == "bursts":
        rate, centre, width = q(0), q(1), p[2]
        x = _band_noise(rng, n, centre, width) * _pulse_train(rng, n, rate, 0.03)
    elif sound.family == "clicks":
        rate, centre = q(0), q(1)
        x = _band_noise(rng, n, centre, 2000.0) * _pulse_train(rng, n, rate, 0.004)
    elif sound.family == "growl":
        centre, rate = q(0), q(1)
        x = _band_noise(rng, n, centre, 250.0) * (1 + 0.9 * np.sin(2 * np.pi * rate * t))
    elif sound.family == "bell":
        f0, interval = q(0), q(1)
        strikes = np.mod(t + rng.uniform(0, interval), interval)
        partials = sum(a * np.sin(2 * np.pi * f0 * r * t) for a, r in ((1, 1), (0.6, 2.76), (0.4, 5.4), (0.3, 8.9)))
        x = partials * np.exp(-strikes * 4.0)
    elif sound.family == "hoots":
        f0, rate = q(0), q(1)
        x = _harmonics(2 * np.pi * f0 * t, 3, 0.3) * _pulse_train(rng, n, rate, 0.08)
    elif sound.family == "croaks":
        f0, rate = q(0), q(1)
        x = _harmonics(2 * np.pi * f0 * t, 5, 0.7) * (np.sin(2 * np.pi * 40 * t) > 0) * _pulse_train(rng, n, rate, 0.06)
    elif sound.family == "rumble":
        x = _band_noise(rng, n, q(0), 80.0) * np.exp(-((t - rng.uniform(0.2, 0.8) * t[-1]) / 0.5) ** 2)
    else:
        raise ValueError(f"unknown sound family {sound.family!r}")
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


# ---------------------------------------------------------------------------------------------
# Picture
# ---------------------------------------------------------------------------------------------

def _shape_mask(shape: str, yy, xx, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    if shape == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
    if shape == "ring":
        return np.abs(np.sqrt(dy ** 2 + dx ** 2) - 0.75 * r) <= 0.25 * r
    if shape == "bar":
        return (np.abs(dy) <= 0.35 * r) & (np.abs(dx) <= 1.3 * r)
    if shape == "cross":
        return ((np.abs(dy) <= 0.3 * r) & (np.abs(dx) <= r)) | ((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _place(look: Look, time: float, size: int, base: tuple[float, float], radius: float, phase: float, speed: float
           ) -> tuple[float, float, float, tuple, bool]:
    """(cy, cx, radius, colour, visible) of an object with `look` at `time`."""
    cy, cx = base
    amp = 0.22 * size
    angle = 2 * np.pi * speed * time + phase
    colour, visible = look.colour, True
    if look.motion == "horizontal":
        cx += amp * np.sin(angle)
    elif look.motion == "vertical":
        cy += amp * np.sin(angle)
    elif look.motion == "circular":
        cy, cx = cy + amp * np.sin(angle), cx + amp * np.cos(angle)
    elif look.motion == "falling":
        cy = (cy + size * speed * time) % size
    elif look.motion == "pulse":
        radius *= 1 + 0.35 * np.sin(angle)
    elif look.motion == "blink":
        colour = look.colour if np.sin(angle) >= 0 else (230, 30, 30)
    elif look.motion == "swing":
        cx += 0.5 * amp * np.sin(angle)
        cy += 0.15 * amp * np.cos(2 * angle)
    elif look.motion == "hop":
        cy -= amp * abs(np.sin(angle))
    elif look.motion == "flash":
        visible = np.sin(angle) > -0.3
    elif look.motion != "static":
        raise ValueError(f"unknown motion {look.motion!r}")
    return cy, cx, radius, colour, visible


def render_frames(look: Look, rng: np.random.Generator, config: WorldConfig, num_frames: int,
                  distractor: Look | None = None) -> np.ndarray:
    """uint8 [num_frames, size, size, 3] of one jittered object with `look` (and a small distractor)."""
    size = config.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    background = rng.uniform(20, 70) + rng.normal(0, 6, (size, size, 1))
    centre = (size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size)
    jitter = np.exp(rng.uniform(-look.spread, look.spread)) if look.spread else rng.uniform(0.85, 1.15)
    objects = [(look, centre, 0.2 * size * look.scale * jitter, 1.0)]
    if distractor is not None:
        corner = rng.uniform(0.12, 0.88, 2) * size
        objects.append((distractor, (corner[0], corner[1]), 0.09 * size, 0.45))
    phase, speed_factor = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15)
    tint = rng.uniform(-15, 15, 3)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for i in range(num_frames):
        image = np.repeat(background, 3, axis=2)
        for obj_look, base, radius, strength in objects:
            cy, cx, r, colour, visible = _place(obj_look, i / config.video_fps, size, base, radius, phase,
                                                 obj_look.speed * speed_factor)
            if visible:
                mask = _shape_mask(obj_look.shape, yy, xx, cy, cx, r)
                colour = np.clip(np.asarray(colour, np.float64) + tint, 0, 255)
                image[mask] = (1 - strength) * image[mask] + strength * colour
        image += rng.normal(0, config.image_noise, image.shape)
        frames[i] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


# ---------------------------------------------------------------------------------------------
# Clips and files
# ---------------------------------------------------------------------------------------------

def clip_rng(config: WorldConfig, class_index: int, split: str, number: int) -> np.random.Generator:
    split_index = (*SEEN_SPLITS, UNSEEN_SPLIT).index(split)
    return np.random.default_rng([config.seed, class_index, split_index, number])


def render_clip(class_index: int, rng: np.random.Generator, config: WorldConfig,
                classes: Sequence[ToyClass] = CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 [T, size, size, 3], audio float32 [samples] in [-1, 1]) of one clip."""
    toy = classes[class_index]
    pool = [c for c in classes if c.unseen == toy.unseen and c.name != toy.name]
    n = int(round(config.seconds * SAMPLE_RATE))
    sound = render_sound(toy.sound, rng, n)
    if rng.uniform() < config.distractor_prob:
        other = pool[rng.integers(len(pool))]
        sound = sound + rng.uniform(0.1, 0.3) * render_sound(other.sound, rng, n)
    snr = 10 ** (rng.uniform(*config.snr_db) / 20)
    sound = sound + rng.standard_normal(n) * np.sqrt(np.mean(sound ** 2)) / snr
    audio = (0.3 * sound / np.max(np.abs(sound))).astype(np.float32)
    distractor = pool[rng.integers(len(pool))].look if rng.uniform() < config.distractor_prob else None
    frames = render_frames(toy.look, rng, config, int(round(config.seconds * config.video_fps)), distractor)
    return frames, audio


def clip_plan(config: WorldConfig, classes: Sequence[ToyClass] = CLASSES) -> list[tuple[str, str, int, int]]:
    """(ytid, split, class index, number) of every clip, in a fixed order."""
    plan = []
    pretrain = tuple((split, count) for split, count in config.per_class if split == "pretrain")
    for class_index, toy in enumerate(classes):
        # Unseen classes: never in the distillation splits, but the warm-started models know them.
        counts = (*pretrain, (UNSEEN_SPLIT, config.unseen_per_class)) if toy.unseen else config.per_class
        for split, count in counts:
            for number in range(count):
                plan.append((f"toy{class_index:02d}-{split}-{number:04d}", split, class_index, number))
    return plan


def _write_clip(task) -> None:
    path, class_index, split, number, config = task
    if os.path.exists(path):
        return
    frames, audio = render_clip(class_index, clip_rng(config, class_index, split, number), config)
    tmp = path + ".tmp"
    media.write_mp4(tmp, frames, config.video_fps, audio, container_format="mp4", video_bitrate=400_000)
    os.replace(tmp, path)


def _pitch_ratio(a: Sound, b: Sound) -> float | None:
    """f where `b` is `a` with its frequency parameters f times higher and the same spread > 0
    (1.0 where they are the same sound), else None."""
    if a == b:
        return 1.0
    if a.family != b.family or a.spread != b.spread or not a.spread or len(a.params) != len(b.params):
        return None
    pitch = PITCH_PARAMS[a.family]
    if any(x != y for i, (x, y) in enumerate(zip(a.params, b.params)) if i not in pitch):
        return None
    ratios = {round(b.params[i] / a.params[i], 4) for i in pitch}
    return ratios.pop() if len(ratios) == 1 else None


def _size_ratio(a: Look, b: Look) -> float | None:
    """f where `b` is `a` f times larger with the same spread > 0 (1.0 where they are the same look), else None."""
    if a == b:
        return 1.0
    if a.spread and dataclasses.replace(a, scale=b.scale) == b:
        return round(b.scale / a.scale, 4)
    return None


def pair_bayes_accuracy(ratio: float | None, spread: float) -> float:
    """The best accuracy on a two-class pair whose one differing parameter is `ratio` times larger in
    one class, jittered log-uniformly by +-spread in both (1.0 where no class is alike, 0.5 where
    the two are the same)."""
    if ratio is None:
        return 1.0
    if ratio == 1.0:
        return 0.5
    return round(float(min(1.0, 0.5 + abs(np.log(ratio)) / (4 * spread))), 4)


def design_table(classes: Sequence[ToyClass] = CLASSES) -> list[dict]:
    """Per class: group (and designed group), signatures, and per modality the class of a hard pair
    that it is alike (differing by one parameter, `ratio` times larger there) with the pair's Bayes
    accuracy, and the classes it is scrambled with in that modality's pretraining."""
    rows = []
    for toy in classes:
        row = {"class": toy.name, "group": toy.group, "designed_group": designed_group(toy), "unseen": toy.unseen,
               "sound": dataclasses.asdict(toy.sound), "look": dataclasses.asdict(toy.look)}
        for modality, ratio_of, spread in (("audio", lambda c: _pitch_ratio(toy.sound, c.sound), toy.sound.spread),
                                           ("visual", lambda c: _size_ratio(toy.look, c.look), toy.look.spread)):
            alike = [(c.name, r) for c in classes if c.name != toy.name and (r := ratio_of(c)) is not None]
            if len(alike) > 1:
                raise ValueError(f"{toy.name!r} is alike {len(alike)} classes in {modality}: {alike}")
            partner, ratio = alike[0] if alike else (None, None)
            row[f"{modality}_partner"] = partner
            row[f"{modality}_partner_ratio"] = ratio
            if partner is None:
                row[f"{modality}_differs"] = None
            else:
                what = ("size" if modality == "visual" else
                        " and ".join(PARAM_NAMES[toy.sound.family][i] for i in PITCH_PARAMS[toy.sound.family]))
                row[f"{modality}_differs"] = (f"{what} x{ratio:.3g} in {partner!r}, the rest alike; per clip both "
                                              f"jitter x exp(U(-{spread:g}, {spread:g})), so the ranges overlap")
            row[f"{modality}_pair_bayes_accuracy"] = pair_bayes_accuracy(ratio, spread)
            row[f"{modality}_pretrain_scrambled_with"] = [c for c in scrambled_with(toy.name, modality)
                                                         if c != toy.name]
        rows.append(row)
    return rows


def mid(class_index: int) -> str:
    """The made-up AudioSet MID of a toy class in the toy world's AudioSet-format files."""
    return f"/t/toy{class_index:02d}"


def write_audioset_files(out_dir, plan, config: WorldConfig) -> str:
    """The unseen clips of `plan` as AudioSet evaluation files in `out_dir`: eval_segments.csv (header
    comments, then YTID, start, end, quoted MIDs), ontology.json (every class) and keep.tsv (the
    unseen classes' MIDs). Returns the CSV path."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "eval_segments.csv")
    with open(csv_path, "w", encoding="utf-8") as f:
        f.write("# Segments csv created by data_pipelines.toy_world: the toy world's unseen classes\n")
        f.write("# YTID, start_seconds, end_seconds, positive_labels\n")
        for ytid, split, c, _ in plan:
            if split == UNSEEN_SPLIT:
                f.write(f'{ytid}, 0.000, {config.seconds:.3f}, "{mid(c)}"\n')
    with open(os.path.join(out_dir, "ontology.json"), "w", encoding="utf-8") as f:
        json.dump([{"id": mid(i), "name": c.name} for i, c in enumerate(CLASSES)], f, indent=1)
    with open(os.path.join(out_dir, "keep.tsv"), "w", encoding="utf-8") as f:
        f.writelines(f"{mid(i)}\n" for i, c in enumerate(CLASSES) if c.unseen)
    return csv_path


def generate(out_dir, config: WorldConfig = WorldConfig(), *, workers: int | None = None) -> str:
    """Writes `out_dir/videos/*.mp4`, `out_dir/toy_world.csv` (every split but "unseen"),
    `out_dir/audioset/` (the unseen clips, `write_audioset_files`) and `out_dir/design.json`;
    returns the CSV path.

    Existing mp4 files are kept (a rerun finishes an interrupted one).
    """
    out_dir = os.fspath(out_dir)
    video_dir = os.path.join(out_dir, "videos")
    os.makedirs(video_dir, exist_ok=True)
    plan = clip_plan(config)
    tasks = [(os.path.join(video_dir, f"{ytid}_000000.mp4"), c, split, number, config)
             for ytid, split, c, number in plan]
    workers = os.cpu_count() if workers is None else workers
    if workers > 1:
        from data_pipelines.converter import worker_pool

        with worker_pool(workers) as pool:
            for _ in pool.map(_write_clip, tasks, chunksize=8):
                pass
    else:
        for task in tasks:
            _write_clip(task)
    csv_path = os.path.join(out_dir, "toy_world.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        for ytid, split, c, _ in plan:
            if split != UNSEEN_SPLIT:
                writer.writerow([ytid, 0, CLASSES[c].name, split])
    write_audioset_files(os.path.join(out_dir, "audioset"), plan, config)
    with open(os.path.join(out_dir, "design.json"), "w", encoding="utf-8") as f:
        hard_pairs = {"ratio": HARD_RATIO, "spread": HARD_SPREAD,
                      "pair_bayes_accuracy": pair_bayes_accuracy(HARD_RATIO, HARD_SPREAD),
                      "varies": {"audio": {family: [PARAM_NAMES[family][i] for i in PITCH_PARAMS[family]]
                                           for family in sorted({c.sound.family for c in CLASSES if c.sound.spread})},
                                 "visual": "size (radius, relative to 0.2 of the frame)"}}
        json.dump({"config": dataclasses.asdict(config), "hard_pairs": hard_pairs,
                   "pretrain_scrambled": {m: [list(g) for g in groups] for m, groups in PRETRAIN_SCRAMBLED.items()},
                   "classes": design_table()},
                  f, indent=1)
        f.write("\n")
    return csv_path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every split's clips per class")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--no-convert", action="store_true", help="only write the mp4s and the CSV")
    p.add_argument("--fps", type=float, default=4.0, help="frames per second kept by the converter")
    args = p.parse_args(argv)

    base = WorldConfig()
    config = dataclasses.replace(
        base, seed=args.seed, unseen_per_class=max(1, round(base.unseen_per_class * args.scale)),
        per_class=tuple((s, max(1, round(n * args.scale))) for s, n in base.per_class))
    csv_path = generate(args.out, config, workers=args.workers)
    print(f"wrote {len(clip_plan(config))} clips and {csv_path}")
    if not args.no_convert:
        from data_pipelines import audioset, vggsound

        decode = ["--video-dir", os.path.join(args.out, "videos"), "--out", os.path.join(args.out, "tfrecords"),
                  "--fps", str(args.fps), "--max-seconds", str(config.seconds), "--max-short-side", str(config.size),
                  "--workers", str(args.workers), "--clips-per-shard", "500"]
        vggsound.main(["--csv", csv_path, "--name", "toy_world", "--analysis-size", "0", *decode])
        audioset_dir = os.path.join(args.out, "audioset")
        audioset.main(["--csv", os.path.join(audioset_dir, "eval_segments.csv"),
                       "--ontology", os.path.join(audioset_dir, "ontology.json"),
                       "--keep", os.path.join(audioset_dir, "keep.tsv"), "--name", "toy_world_unseen", *decode])


if __name__ == "__main__":
    main()
