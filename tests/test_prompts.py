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
