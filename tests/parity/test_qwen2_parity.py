"""Our Qwen2 (through the production converter) vs Hugging Face's, in float32."""
import numpy as np
import pytest
import torch

from distill_jax.convert import load_hf
from distill_jax.decoding import generate, score_choices
from distill_jax.models.qwen2 import default_position_ids

VOCAB = 128


def _batch(batch=3, length=9, pads=(0, 3, 6), seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids, mask


def _hf_logits(hf, ids, mask):
    positions = np.asarray(default_position_ids(mask))
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # query/kv head ratios 1, 2, 4
def test_logits_match_hf_left_padded(tiny_qwen2_dir, tie, kv_heads):
    path, hf = tiny_qwen2_dir(tie_word_embeddings=tie, num_key_value_heads=kv_heads)
    model = load_hf(path)
    ids, mask = _batch()
    ours = np.asarray(model(input_ids=ids, attention_mask=mask))
    ref = _hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    assert ours.shape == (3, 9, VOCAB)
    diff = np.abs(ours - ref)[valid].max()
    assert diff <= 1e-4, diff
    assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero numbers


def test_left_padding_does_not_change_a_row(tiny_qwen2_dir):
    path, _ = tiny_qwen2_dir()
    model = load_hf(path)
    ids, mask = _batch(batch=1, pads=(0,))
    padded_ids = np.concatenate([np.zeros((1, 4), np.int64), ids], axis=1)
    padded_mask = np.concatenate([np.zeros((1, 4), np.int64), mask], axis=1)
    plain = np.asarray(model(input_ids=ids, attention_mask=mask))
    padded = np.asarray(model(input_ids=padded_ids, attention_mask=padded_mask))[:, 4:]
    np.testing.assert_allclose(padded, plain, atol=1e-5)


def test_score_choices_are_hf_logits_at_last_position(tiny_qwen2_dir):
    path, hf = tiny_qwen2_dir(tie_word_embeddings=True)
    model = load_hf(path)
    ids, mask = _batch()
    letters = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    scores = np.asarray(score_choices(model, {"input_ids": ids, "attention_mask": mask}, letters))
    ref = _hf_logits(hf, ids, mask)[:, -1, letters]
    assert scores.shape == (3, 10)
    assert np.abs(scores - ref).max() <= 1e-4


def test_score_choices_rejects_right_padding(tiny_qwen2_dir):
    path, _ = tiny_qwen2_dir()
    model = load_hf(path)
    ids, mask = _batch(pads=(0, 0, 0))
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match=r"left-padded: rows \[1\]"):
        score_choices(model, {"input_ids": ids, "attention_mask": mask}, [1, 2])


def test_greedy_generate_equals_hf(tiny_qwen2_dir):
    path, hf = tiny_qwen2_dir()
    model = load_hf(path)
    ids, mask = _batch(length=7, pads=(0, 2, 5), seed=1)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=12, pad_token_id=0, eos_token_id=None).numpy()[:, 7:]
    ours = np.asarray(generate(model, ids, mask, 12))
    np.testing.assert_array_equal(ours, ref)


def test_greedy_generate_stops_at_eos_like_hf(tiny_qwen2_dir):
    path, hf = tiny_qwen2_dir()
    model = load_hf(path)
    ids, mask = _batch(length=7, pads=(0, 2, 5), seed=1)
    free_run = np.asarray(generate(model, ids, mask, 12))
    eos = int(free_run[0, 3])  # a token row 0 emits mid-way: it must end row 0 there
    pad = 127
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=12, pad_token_id=pad, eos_token_id=eos).numpy()[:, 7:]
    ours = np.asarray(generate(model, ids, mask, 12, eos_token_id=eos, pad_token_id=pad))
    first_eos = int(np.flatnonzero(free_run[0] == eos)[0])
    assert (ours[0, first_eos + 1:] == pad).all()
    # HF stops once every row is done; our output has fixed length and pads the rest.
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == pad).all()
