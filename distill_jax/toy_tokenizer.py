"""A tiny, offline Qwen2-style tokenizer for tests and the toy world.

`make_qwen2_tokenizer(path)` trains a byte-level BPE (the same normalizer, pre-tokenizer
regex and decoder as Qwen2's tokenizer) on a small built-in corpus, adds Qwen2's special
tokens after the learned vocabulary (as Qwen2 numbers them: after the BPE ids), and saves a
directory that `transformers.AutoTokenizer.from_pretrained` loads as a `Qwen2Tokenizer`, with
Qwen2-Audio-Instruct's chat template in `chat_template.jinja`.

The toy world's tokenizer (`make_qwen2_tokenizer(path, words=class names, vocab_size=1024)`)
adds its class names to the corpus with room for every word to become one token, so its
prompts stay short (the tiny LMs' cost is proportional to the prompt length).

The output is deterministic: the same bytes for the same arguments, in every process.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from distill_jax.prompts import LETTERS
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Qwen2's pre-tokenizer split (transformers/models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# In Qwen2's order (151643, 151644, ...); only the ones the Qwen2-Audio / Qwen2-VL prompts use.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2.5-Omni's own names for its vision tokens (its ids equal Qwen2-VL's vision_start/end and
# image/video pads); added after the others only for a toy Omni (`omni=True`), so the audio and
# visual toy models' vocabulary is the same with or without it.
OMNI_SPECIAL_TOKENS = ["<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>"]

# Qwen2-Audio-7B-Instruct's chat template (= Qwen2AudioProcessor.default_chat_template).
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or message['type'] == 'audio' or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

_CLASS_NAMES = [
    "dog barking", "cat meowing", "baby crying", "church bell ringing", "playing acoustic guitar",
    "playing piano", "car engine starting", "helicopter", "chainsaw", "lawn mowing",
    "rooster crowing", "cow lowing", "train horning", "thunder", "people clapping",
    "playing violin", "playing drum kit", "bird chirping", "male speech", "female singing",
    "horse clip-clop", "frog croaking", "police car siren", "typing on keyboard", "ocean waves",
]

_CORPUS = [
    "Classify the sounding object into one of the categories below:",
    "Answer with the letter only.",
    "You are a helpful assistant.",
    "system", "user", "assistant", "Audio 1: ", "Audio 2: ", "Video:",
    "What is the sounding object in this clip? The answer is A.",
    " ".join("ABCDEFGHIJ"), "ABCDEFGHIJ", "0123456789",
    *[f"{letter}. {name}" for letter, name in zip("ABCDEFGHIJ" * 3, _CLASS_NAMES)],
    *_CLASS_NAMES,
]

BPE_VOCAB_SIZE = 384  # 256 byte symbols + 128 merges; the special tokens come on top.


def _build(corpus: list[str], vocab_size: int, special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus * 4, trainer=trainer, length=len(corpus) * 4)
    tok.add_special_tokens(special)
    return tok


def make_qwen2_tokenizer(path, *, words: Sequence[str] = (), vocab_size: int = BPE_VOCAB_SIZE,
                         omni: bool = False) -> str:
    """Write a tiny Qwen2 tokenizer directory at `path` (created if needed); returns the path.

    `words`: extra corpus lines (e.g. class names, also as "A. name" option lines);
    `vocab_size`: BPE symbols before the special tokens (256 bytes + merges); `omni`: add
    Qwen2.5-Omni's vision tokens (`OMNI_SPECIAL_TOKENS`) after the others.
    """
    special = SPECIAL_TOKENS + (OMNI_SPECIAL_TOKENS if omni else [])
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    corpus = list(_CORPUS)
    for word in words:
        corpus += [word, *(f"{letter}. {word}" for letter in LETTERS)]
    tok = _build(corpus, vocab_size, special)
    for letter in LETTERS:
        ids = tok.encode(letter, add_special_tokens=False).ids
        assert len(ids) == 1, (letter, ids)
    tok.save(os.path.join(path, "tokenizer.json"), pretty=True)
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in special
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": special[1:],
        "bos_token": None,
        "eos_token": "<|im_end|>",  # Qwen2-*-Instruct's eos; the base models use <|endoftext|>
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 32768,
        "split_special_tokens": False,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(QWEN2_AUDIO_CHAT_TEMPLATE)
    return path
