"""distill_jax.prompts against Qwen2AudioProcessor (chat template + <|AUDIO|> expansion + tokenizer)."""
import json
import os

import numpy as np
import pytest
import transformers

from data_pipelines.audio import num_audio_tokens
from distill_jax import prompts
from distill_jax.toy_tokenizer import SPECIAL_TOKENS, make_qwen2_tokenizer

SR = 16000
OPTIONS = ["dog barking", "cat meowing", "baby crying", "church bell ringing", "playing acoustic guitar",
           "playing piano", "car engine starting", "helicopter", "chainsaw", "lawn mowing"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_qwen2_tokenizer(tmp_path_factory.mktemp("tiny_qwen2_tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return prompts.load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def processor(tok):
    fe = transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=SR)
    return transformers.Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok)


def _messages(question, system=None):
    user = {"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": question}]}
    return ([{"role": "system", "content": system}] if system is not None else []) + [user]


def _reference(processor, texts, waves):
    """The processor's own expansion and tokenization, plus N from its feature mask."""
    out = processor(text=list(texts), audio=list(waves), sampling_rate=SR, return_tensors="np", padding=True)
    lengths = out["feature_attention_mask"].sum(-1)
    n = [(((int(l) - 1) // 2 + 1) - 2) // 2 + 1 for l in lengths]
    return out, n


def _waves(*seconds, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(round(s * SR)))).astype(np.float32) for s in seconds]


def test_tiny_tokenizer_is_a_qwen2_tokenizer(tok, tok_dir):
    assert type(tok).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    assert 300 <= len(tok) <= 500
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and min(ids) >= len(tok) - len(SPECIAL_TOKENS)
    for t in SPECIAL_TOKENS:  # each special token is one token inside text, too
        assert tok.encode(f"a{t}b", add_special_tokens=False)[1:2] == [tok.convert_tokens_to_ids(t)]
    # Byte-level round trip, including non-ASCII text.
    text = "Classify the sounding object: A. café — 犬\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # Same bytes again: the helper is deterministic.
    again = make_qwen2_tokenizer(os.path.join(tok_dir, "again"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        with open(os.path.join(tok_dir, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name
    with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "Qwen2Tokenizer"


def test_chat_template_matches_qwen2_audio_default(tok, processor):
    # The tiny tokenizer's template is Qwen2AudioProcessor's built-in (Qwen2-Audio-Instruct's) template.
    assert tok.chat_template == processor.default_chat_template
    assert processor.chat_template == processor.default_chat_template


@pytest.mark.parametrize("system", [None, "Custom system text."])
def test_prompt_text_matches_chat_template(processor, system):
    question = prompts.format_question(OPTIONS)
    rendered = processor.apply_chat_template(_messages(question, system), add_generation_prompt=True,
                                             tokenize=False)
    kw = {} if system is None else {"system": system}
    assert prompts.qwen2_audio_prompt(question, num_audio_tokens=1, **kw) == rendered
    assert rendered == (
        f"<|im_start|>system\n{system or 'You are a helpful assistant.'}<|im_end|>\n<|im_start|>user\n"
        f"Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n{question}<|im_end|>\n<|im_start|>assistant\n")
    expanded = prompts.qwen2_audio_prompt(question, num_audio_tokens=3, **kw)
    assert expanded == rendered.replace("<|AUDIO|>", "<|AUDIO|>" * 3)


@pytest.mark.parametrize("seconds,expected_n", [(10.0, 250), (3.3, 82)])
def test_encode_matches_processor(tok, processor, seconds, expected_n):
    question = prompts.format_question(OPTIONS)
    text = processor.apply_chat_template(_messages(question), add_generation_prompt=True, tokenize=False)
    out, (n,) = _reference(processor, [text], _waves(seconds))
    assert n == expected_n == num_audio_tokens(int(out["feature_attention_mask"].sum()))
    ours = prompts.encode_qwen2_audio(tok, question, num_audio_tokens=n)
    ref = out["input_ids"][0].tolist()
    assert ours == ref
    assert ref.count(tok.convert_tokens_to_ids("<|AUDIO|>")) == n
    assert out["attention_mask"].all()
    # An off-by-one N is a different sequence (the comparison can fail).
    assert prompts.encode_qwen2_audio(tok, question, num_audio_tokens=n + 1) != ref


def test_left_pad_matches_processor_padding(tok, processor):
    questions = [prompts.format_question(OPTIONS),
                 prompts.format_question(OPTIONS[:3], "Which one?\n{options}")]
    texts = [processor.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False)
             for q in questions]
    waves = _waves(10.0, 3.3, seed=1)
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        out, n = _reference(processor, texts, waves)
    finally:
        tok.padding_side = old_side
    assert n == [250, 82]
    seqs = [prompts.encode_qwen2_audio(tok, q, num_audio_tokens=k) for q, k in zip(questions, n)]
    assert len(seqs[0]) != len(seqs[1])
    ids, mask = prompts.left_pad(seqs, tok.pad_token_id)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == out["input_ids"].shape
    np.testing.assert_array_equal(ids, out["input_ids"])
    np.testing.assert_array_equal(mask, out["attention_mask"])
    assert mask[:, -1].all() and not mask.all()
    # The last position is the answer position: the assistant header's final "\n".
    tail = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert (ids[:, -len(tail):] == tail).all()

    ids2, mask2 = prompts.left_pad(seqs, tok.pad_token_id, length=ids.shape[1] + 5)
    np.testing.assert_array_equal(ids2[:, 5:], ids)
    assert (ids2[:, :5] == tok.pad_token_id).all() and not mask2[:, :5].any()
    with pytest.raises(ValueError, match="longer than length"):
        prompts.left_pad(seqs, tok.pad_token_id, length=ids.shape[1] - 1)
    with pytest.raises(ValueError, match="empty"):
        prompts.left_pad([[1, 2], []], 0)


def test_letter_token_ids(tok):
    ids = prompts.letter_token_ids(tok)
    assert len(ids) == 10 and len(set(ids)) == 10
    assert [tok.decode([i]) for i in ids] == list("ABCDEFGHIJ")
    # The answer letter right after the assistant header is exactly this token.
    for letter, i in zip("ABCDEFGHIJ", ids):
        prompt = prompts.chatml_prompt("q")
        full = tok.encode(prompt + letter, add_special_tokens=False)
        assert full == tok.encode(prompt, add_special_tokens=False) + [i]
    assert prompts.letter_token_ids(tok, "CA") == [ids[2], ids[0]]
    with pytest.raises(ValueError, match="one token"):
        prompts.letter_token_ids(tok, ["A", "Zebra crossing"])


def test_format_question():
    q = prompts.format_question(OPTIONS)
    assert q == ("Classify the sounding object into one of the categories below:\n"
                 "A. dog barking\nB. cat meowing\nC. baby crying\nD. church bell ringing\n"
                 "E. playing acoustic guitar\nF. playing piano\nG. car engine starting\n"
                 "H. helicopter\nI. chainsaw\nJ. lawn mowing\nAnswer with the letter only.")
    assert prompts.format_question(["x", "y"], "Pick:\n{options}") == "Pick:\nA. x\nB. y"


@pytest.mark.parametrize("options,template,match", [
    (["dog"], prompts.DEFAULT_QUESTION, "at least 2"),
    ([], prompts.DEFAULT_QUESTION, "at least 2"),
    ([f"class {i}" for i in range(27)], prompts.DEFAULT_QUESTION, "at most 26"),
    (["dog", ""], prompts.DEFAULT_QUESTION, r"option 1 \(B\) is empty"),
    (["dog", "   "], prompts.DEFAULT_QUESTION, "empty"),
    (["dog", "cat", "dog"], prompts.DEFAULT_QUESTION, "duplicate option 'dog'"),
    (["dog", "cat"], "Classify the sounding object.", r"must contain '\{options\}'"),
    (["dog", "cat"], "{options} {extra}", "format field"),
])
def test_format_question_errors(options, template, match):
    with pytest.raises(ValueError, match=match):
        prompts.format_question(options, template)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prompts.load_tokenizer(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        prompts.load_tokenizer(tmp_path)


def test_encode_rejects_tokenizer_without_audio_token(tmp_path):
    # A plain GPT-2 style byte-level BPE without <|AUDIO|> as a special token splits it into pieces.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["hello world"], trainers.BpeTrainer(
        vocab_size=260, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(ValueError, match=r"<\|AUDIO\|>"):
        prompts.encode_qwen2_audio(plain, "q", num_audio_tokens=4)


# ---------------------------------------------------------------------------------------------
# Qwen2.5-Omni
# ---------------------------------------------------------------------------------------------

def _hf_sounded_video(grid, second_per_grid, num_audio):
    """Qwen2_5OmniProcessor's own expansion of a video with its audio (its method, on a stand-in for
    the processor object: building the real one needs torchvision's video processor)."""
    import types

    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

    stand_in = types.SimpleNamespace(
        video_processor=types.SimpleNamespace(merge_size=2), audio_bos_token=prompts.AUDIO_BOS,
        audio_eos_token=prompts.AUDIO_EOS, video_token=prompts.OMNI_VIDEO, audio_token=prompts.AUDIO_TOKEN,
        get_chunked_index=lambda indices, per_chunk: Qwen2_5OmniProcessor.get_chunked_index(None, indices, per_chunk))
    body = Qwen2_5OmniProcessor.replace_video_with_audio_token(
        stand_in, {"video_grid_thw": [np.asarray(grid)], "video_second_per_grid": [second_per_grid]}, 0,
        {"num_audio_tokens": [num_audio]}, 0, position_id_per_seconds=25, seconds_per_chunk=2.0)
    return prompts.VISION_BOS + body + prompts.VISION_EOS  # the chat template's <|vision_bos|><|VIDEO|><|vision_eos|>


@pytest.mark.parametrize("grid, second_per_grid, num_audio", [
    ((10, 26, 46), 1.0, 250),  # a VGGSound clip: 10 s at 2 fps, 360x640 -> 364x644, 30 s window's first 10 s
    ((3, 4, 6), 2.0, 17),  # video chunks past the audio's
    ((2, 4, 4), 0.5, 180),  # audio chunks past the video's
])
def test_sounded_video_layout_equals_the_omni_processor(grid, second_per_grid, num_audio):
    ours = prompts.sounded_video_placeholder(grid, num_audio, second_per_grid=second_per_grid)
    assert ours == _hf_sounded_video(grid, second_per_grid, num_audio)
    assert ours.count(prompts.AUDIO_TOKEN) == num_audio
    assert ours.count(prompts.OMNI_VIDEO) == grid[0] * grid[1] * grid[2] // 4


@pytest.fixture(scope="module")
def omni_tok(tmp_path_factory):
    return prompts.load_tokenizer(make_qwen2_tokenizer(tmp_path_factory.mktemp("omni_tok"), omni=True))


def test_omni_prompts_of_the_three_conditions(omni_tok, tok):
    question = prompts.format_question(OPTIONS)
    audio = prompts.qwen2_5_omni_prompt(question, "audio", num_audio_tokens=5)
    assert audio == (f"<|im_start|>system\n{prompts.OMNI_SYSTEM}<|im_end|>\n<|im_start|>user\n<|audio_bos|>"
                     f"{'<|AUDIO|>' * 5}<|audio_eos|>{question}<|im_end|>\n<|im_start|>assistant\n")
    video = prompts.qwen2_5_omni_prompt(question, "video", grid_thw=(2, 4, 6), system=None)
    assert video == f"<|im_start|>user\n<|vision_bos|>{'<|VIDEO|>' * 12}<|vision_eos|>{question}<|im_end|>\n" \
                    "<|im_start|>assistant\n"
    ids = prompts.encode_qwen2_5_omni(omni_tok, question, "audio_video", grid_thw=(2, 4, 6), num_audio_tokens=60,
                                      second_per_grid=1.0)
    bos, av_bos = (omni_tok.convert_tokens_to_ids(t) for t in (prompts.VISION_BOS, prompts.AUDIO_BOS))
    start = ids.index(bos)
    assert ids[start + 1] == av_bos and ids.count(omni_tok.convert_tokens_to_ids(prompts.AUDIO_TOKEN)) == 60
    # The toy tokenizer keeps every id when the Omni tokens are added (they come last).
    assert all(omni_tok.convert_tokens_to_ids(t) == tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS)
    with pytest.raises(ValueError, match=r"does not know '<\|VIDEO\|>' as one token"):
        prompts.encode_qwen2_5_omni(tok, question, "video", grid_thw=(2, 4, 6))
    with pytest.raises(ValueError, match="condition 'sounded' is not one of"):
        prompts.qwen2_5_omni_prompt(question, "sounded", num_audio_tokens=5)
