"""Multiple-choice prompts for the audio and visual teachers, and their token ids.

Both Qwen2-Audio-7B-Instruct and Qwen2-VL-7B-Instruct use the ChatML layout

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n

and differ only in how the media placeholder is written into the user turn. `chatml_prompt`
renders the layout; `qwen2_audio_prompt` supplies the audio placeholder (already expanded to
one `<|AUDIO|>` per audio-encoder output frame, as `Qwen2AudioProcessor` expands it; the count
is `data_pipelines.audio.num_audio_tokens` of the clip's real mel frames). A Qwen2-VL
prompt (`qwen2_vl_prompt`) has `<|vision_start|><|video_pad|>...<|vision_end|>` as the media part
(t*h*w / 4 pad tokens for a (t, h, w) grid: `data_pipelines.vision.num_vision_tokens`).

The answer is one letter; it is scored by the logits of the letter tokens at the last position
of the prompt (`letter_token_ids`), so batches are padded on the left (`left_pad`).

Pure Python + a Hugging Face tokenizer object; no JAX here.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

DEFAULT_QUESTION = (
    "Classify the sounding object into one of the categories below:\n{options}\nAnswer with the letter only."
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option letters; a question uses the first num_options
NUM_OPTIONS = 10  # the paper's 10-way questions
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2-Audio special tokens (Qwen2AudioProcessor's defaults).
AUDIO_BOS = "<|audio_bos|>"
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_EOS = "<|audio_eos|>"

# Qwen2-VL special tokens (Qwen2VLProcessor's defaults).
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Qwen2.5-Omni special tokens (its tokenizer's names; audio ones as Qwen2-Audio's) and system turn.
VISION_BOS = "<|vision_bos|>"
VISION_EOS = "<|vision_eos|>"
OMNI_IMAGE = "<|IMAGE|>"
OMNI_VIDEO = "<|VIDEO|>"
OMNI_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
               "auditory and visual inputs, as well as generating text and speech.")
# What the audio-visual model is shown: the sound alone, the silent video, or the video with its sound.
CONDITIONS = ("audio", "video", "audio_video")


# ---------------------------------------------------------------------------------------------
# Question text
# ---------------------------------------------------------------------------------------------

def format_question(options: Sequence[str], question_template: str = DEFAULT_QUESTION) -> str:
    """The question with `options` rendered as lines "A. dog barking", "B. ...", ...

    `question_template` is a format string with one `{options}` field (the option lines joined
    by newlines). 2 to 26 distinct, non-empty options (the paper asks 10).
    """
    if isinstance(options, str):
        raise TypeError("options must be a sequence of option names, not a single string")
    options = list(options)
    if len(options) < 2:
        raise ValueError(f"need at least 2 options, got {len(options)}")
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options (letters {LETTERS}), got {len(options)}")
    for i, name in enumerate(options):
        if not isinstance(name, str):
            raise TypeError(f"option {i} is {type(name).__name__}, not str: {name!r}")
        if not name.strip():
            raise ValueError(f"option {i} ({LETTERS[i]}) is empty")
        if "\n" in name:
            raise ValueError(f"option {i} ({LETTERS[i]}) contains a newline: {name!r}")
    seen: dict[str, int] = {}
    for i, name in enumerate(options):
        if name in seen:
            raise ValueError(f"duplicate option {name!r} at positions {seen[name]} and {i}")
        seen[name] = i
    if "{options}" not in question_template:
        raise ValueError(f"question_template must contain '{{options}}': {question_template!r}")
    lines = "\n".join(f"{letter}. {name}" for letter, name in zip(LETTERS, options))
    try:
        return question_template.format(options=lines)
    except (KeyError, IndexError) as e:
        raise ValueError(
            f"question_template has a format field other than {{options}} ({e}); "
            f"write literal braces as {{{{ }}}}: {question_template!r}") from e


# ---------------------------------------------------------------------------------------------
# Chat prompts
# ---------------------------------------------------------------------------------------------

def chatml_prompt(user: str, *, system: str | None = DEFAULT_SYSTEM) -> str:
    """One ChatML user turn followed by the assistant header (add_generation_prompt=True).

    `system=None` leaves out the system turn. (The Qwen2-Audio / Qwen2-VL templates always
    write one: their default is `DEFAULT_SYSTEM`; None is for models whose template doesn't.)
    """
    head = "" if system is None else f"{IM_START}system\n{system}{IM_END}\n"
    return f"{head}{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"


def qwen2_audio_prompt(question: str, *, num_audio_tokens: int, system: str | None = DEFAULT_SYSTEM) -> str:
    """The text Qwen2-Audio-Instruct's chat template renders for one user turn holding one audio
    and then `question`, with add_generation_prompt=True and `<|AUDIO|>` expanded to
    `num_audio_tokens` copies (as Qwen2AudioProcessor expands it).

    A non-None `system` is what a leading {"role": "system", "content": system} message renders;
    the template's default system turn is `DEFAULT_SYSTEM`.
    """
    num_audio_tokens = int(num_audio_tokens)
    if num_audio_tokens < 1:
        raise ValueError(f"num_audio_tokens must be >= 1, got {num_audio_tokens}")
    audio = f"Audio 1: {AUDIO_BOS}{AUDIO_TOKEN * num_audio_tokens}{AUDIO_EOS}\n"
    return chatml_prompt(audio + question, system=system)


def qwen2_vl_prompt(question: str, *, num_vision_tokens: int, kind: str = "video",
                    system: str | None = DEFAULT_SYSTEM) -> str:
    """The text Qwen2-VL-Instruct's chat template renders for one user turn holding one video (or
    image) and then `question`, with add_generation_prompt=True and the pad token expanded to
    `num_vision_tokens` copies (= t*h*w / 4 of the item's grid, as Qwen2VLProcessor expands it).
    """
    num_vision_tokens = int(num_vision_tokens)
    if num_vision_tokens < 1:
        raise ValueError(f"num_vision_tokens must be >= 1, got {num_vision_tokens}")
    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    pad = VIDEO_TOKEN if kind == "video" else IMAGE_TOKEN
    return chatml_prompt(f"{VISION_START}{pad * num_vision_tokens}{VISION_END}{question}", system=system)


def chunk_bounds(times: Sequence[float], per_chunk: float) -> list[tuple[int, int]]:
    """(start, end) runs of non-decreasing `times` cut where they cross k * per_chunk, k = 1, 2, ...
    (= Qwen2.5-Omni's get_chunked_index, in the processor and in the model's position index)."""
    bounds, start, chunk = [], 0, 1
    for i, value in enumerate(times):
        if value >= chunk * per_chunk:
            bounds.append((start, i))
            start, chunk = i, chunk + 1
    bounds.append((start, len(times)))
    return bounds


def interleave_by_chunk(video_times, audio_times, per_chunk: int) -> list[tuple[str, int, int]]:
    """A sounded video's tokens in prompt order, as ("video" | "audio", start, end) runs of the two
    streams: per `per_chunk` of time, the chunk's video tokens, then its audio tokens (= the order
    Qwen2.5-Omni's processor writes them and its position index reads them)."""
    video, audio = chunk_bounds(video_times, per_chunk), chunk_bounds(audio_times, per_chunk)
    runs = []
    for k in range(max(len(video), len(audio))):
        runs += [("video", *video[k])] if k < len(video) else []
        runs += [("audio", *audio[k])] if k < len(audio) else []
    return runs


def sounded_video_placeholder(grid_thw, num_audio_tokens: int, *, second_per_grid: float,
                              position_id_per_seconds: float = 25, seconds_per_chunk: float = 2.0,
                              merge_size: int = 2) -> str:
    """The media part of a Qwen2.5-Omni sounded-video prompt (= Qwen2_5OmniProcessor's
    replace_video_with_audio_token): `<|vision_bos|><|audio_bos|>`, then per `seconds_per_chunk`
    of time the chunk's `<|VIDEO|>` tokens and its `<|AUDIO|>` tokens, then `<|audio_eos|><|vision_eos|>`.

    A video token's time is its temporal patch x `second_per_grid` x `position_id_per_seconds`;
    the k-th audio token's is k (25 audio tokens a second).
    """
    t, h, w = (int(v) for v in grid_thw)
    video_times = np.repeat(np.arange(t), (h // merge_size) * (w // merge_size)) * second_per_grid \
        * position_id_per_seconds
    runs = interleave_by_chunk(video_times, np.arange(int(num_audio_tokens)),
                               int(position_id_per_seconds * seconds_per_chunk))
    body = [(OMNI_VIDEO if kind == "video" else AUDIO_TOKEN) * (end - start) for kind, start, end in runs]
    return "".join([VISION_BOS, AUDIO_BOS, *body, AUDIO_EOS, VISION_EOS])


def qwen2_5_omni_prompt(question: str, condition: str, *, num_audio_tokens: int = 0, grid_thw=None,
                        second_per_grid: float = 1.0, position_id_per_seconds: float = 25,
                        seconds_per_chunk: float = 2.0, merge_size: int = 2, system: str | None = OMNI_SYSTEM) -> str:
    """The text Qwen2.5-Omni's chat template renders for one user turn holding the clip as
    `condition` shows it ("audio": its sound; "video": the silent video; "audio_video": the video
    with its sound, `use_audio_in_video`) and then `question`, placeholders expanded as the
    processor expands them. The template's default system turn is `OMNI_SYSTEM`."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition {condition!r} is not one of {CONDITIONS}")
    if condition != "video" and int(num_audio_tokens) < 1:
        raise ValueError(f"condition {condition!r} needs num_audio_tokens >= 1, got {num_audio_tokens}")
    if condition != "audio" and grid_thw is None:
        raise ValueError(f"condition {condition!r} needs the video's grid_thw")
    if condition == "audio":
        media = f"{AUDIO_BOS}{AUDIO_TOKEN * int(num_audio_tokens)}{AUDIO_EOS}"
    elif condition == "video":
        t, h, w = (int(v) for v in grid_thw)
        media = f"{VISION_BOS}{OMNI_VIDEO * (t * h * w // merge_size ** 2)}{VISION_EOS}"
    else:
        media = sounded_video_placeholder(grid_thw, num_audio_tokens, second_per_grid=second_per_grid,
                                          position_id_per_seconds=position_id_per_seconds,
                                          seconds_per_chunk=seconds_per_chunk, merge_size=merge_size)
    return chatml_prompt(media + question, system=system)


# ---------------------------------------------------------------------------------------------
# Token ids
# ---------------------------------------------------------------------------------------------

def _single_token_id(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer does not know {token!r} as one token: it encodes to {ids}")
    return ids[0]


def encode_prompt(tokenizer, text: str, *, expect: dict[str, int] | None = None) -> list[int]:
    """Token ids of a rendered prompt (no BOS/EOS added), as a processor tokenizes it.

    `expect` maps a special token to how many times it must occur in the ids: a tokenizer that
    does not have the token as one special token would otherwise split it silently.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for token, count in (expect or {}).items():
        tid = _single_token_id(tokenizer, token)
        if (got := ids.count(tid)) != count:
            raise ValueError(f"expected {count} {token} tokens in the prompt ids, found {got}")
    return ids


def encode_qwen2_audio(tokenizer, question: str, num_audio_tokens: int, **kw) -> list[int]:
    """Token ids of `qwen2_audio_prompt(question, num_audio_tokens=..., **kw)`."""
    text = qwen2_audio_prompt(question, num_audio_tokens=num_audio_tokens, **kw)
    return encode_prompt(tokenizer, text, expect={AUDIO_TOKEN: int(num_audio_tokens)})


def encode_qwen2_vl(tokenizer, question: str, num_vision_tokens: int, kind: str = "video", **kw) -> list[int]:
    """Token ids of `qwen2_vl_prompt(question, num_vision_tokens=..., kind=..., **kw)`."""
    text = qwen2_vl_prompt(question, num_vision_tokens=num_vision_tokens, kind=kind, **kw)
    pad = VIDEO_TOKEN if kind == "video" else IMAGE_TOKEN
    return encode_prompt(tokenizer, text, expect={pad: int(num_vision_tokens)})


def encode_qwen2_5_omni(tokenizer, question: str, condition: str, **kw) -> list[int]:
    """Token ids of `qwen2_5_omni_prompt(question, condition, **kw)`, placeholder counts checked."""
    text = qwen2_5_omni_prompt(question, condition, **kw)
    expect = {}
    if condition != "video":
        expect[AUDIO_TOKEN] = int(kw["num_audio_tokens"])
    if condition != "audio":
        t, h, w = (int(v) for v in kw["grid_thw"])
        expect[OMNI_VIDEO] = t * h * w // kw.get("merge_size", 2) ** 2
    return encode_prompt(tokenizer, text, expect=expect)


def letter_token_ids(tokenizer, letters: Sequence[str] | str = LETTERS[:NUM_OPTIONS]) -> list[int]:
    """The id of each answer letter (by default A..J) as the first answer token (right after "assistant\\n", so
    without a leading space). Raises ValueError if a letter is not exactly one token."""
    ids = []
    for letter in letters:
        ids.append(_single_token_id(tokenizer, letter))
    if len(set(ids)) != len(ids):
        raise ValueError(f"letters {list(letters)} map to non-distinct token ids {ids}")
    return ids


def left_pad(sequences: list[list[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token id lists to `length` (default: the longest), so the last position of every
    row is its sequence's last token. Returns (input_ids, attention_mask), both int32 [B, T]."""
    sequences = [list(s) for s in sequences]
    if not sequences:
        raise ValueError("left_pad needs at least one sequence")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError(f"sequence {lengths.index(0)} is empty")
    longest = max(lengths)
    if length is None:
        length = longest
    elif longest > length:
        i = lengths.index(longest)
        raise ValueError(f"sequence {i} has {longest} tokens, longer than length={length}")
    input_ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(sequences), length), dtype=np.int32)
    for i, s in enumerate(sequences):
        input_ids[i, length - len(s):] = s
        attention_mask[i, length - len(s):] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tiktoken.model")


def load_tokenizer(path):
    """`transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)` for a local
    model or tokenizer directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (or is not a directory)")
    present = sorted(os.listdir(path))
    if not any(name in present for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files in {path!r} (looked for {', '.join(_TOKENIZER_FILES)}; "
            f"found {present[:20]}{' ...' if len(present) > 20 else ''})")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
