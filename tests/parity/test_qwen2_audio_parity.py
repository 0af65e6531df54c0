"""Our Qwen2-Audio (through the production converter) vs Hugging Face's, in float32."""
import copy

import numpy as np
import pytest
import torch
from flax import nnx

from distill_jax.convert import load_hf
from distill_jax.layers.scan import layer_paths
from distill_jax.models import lora
from data_pipelines.audio import num_audio_tokens
from distill_jax.models.qwen2_audio import FRAMES_PER_TOKEN, short_clip_frames

AUDIO_TOKEN = 290
CLIP_FRAMES = (1000, 333)  # a 10 s clip and a 3.33 s clip


def make_batch(seed=0):
    """Two clips of different lengths, prompts with their <|AUDIO|> runs, left-padded."""
    rng = np.random.RandomState(seed)
    features = rng.randn(2, 128, 3000).astype(np.float32)
    feature_mask = np.zeros((2, 3000), np.int64)
    for row, frames in enumerate(CLIP_FRAMES):
        feature_mask[row, :frames] = 1
    prompts = [list(rng.randint(0, 280, 3 + row)) + [AUDIO_TOKEN] * num_audio_tokens(frames)
               + list(rng.randint(0, 280, 5)) for row, frames in enumerate(CLIP_FRAMES)]
    length = max(map(len, prompts))
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    return ids, mask, features, feature_mask


def hf_logits(hf, ids, mask, features, feature_mask):
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  input_features=torch.tensor(features), feature_attention_mask=torch.tensor(feature_mask),
                  position_ids=torch.tensor(positions)).logits.numpy()


def test_logits_match_hf_padded_and_short(tiny_qwen2_audio_dir):
    path, hf = tiny_qwen2_audio_dir
    model = load_hf(path)
    ids, mask, features, feature_mask = make_batch()
    ref = hf_logits(hf, ids, mask, features, feature_mask)
    valid = mask.astype(bool)
    padded = np.asarray(model(input_ids=ids, attention_mask=mask, input_features=features,
                              feature_attention_mask=feature_mask))
    assert np.abs(padded - ref)[valid].max() <= 1e-4
    window = short_clip_frames(feature_mask)
    assert window == 1008  # 1000 real frames + 2, rounded up to 8: a third of the 3000-frame work
    short = np.asarray(model(input_ids=ids, attention_mask=mask, input_features=features[..., :window],
                             feature_attention_mask=feature_mask[:, :window]))
    assert np.abs(short - ref)[valid].max() <= 1e-4
    assert np.abs(ref).max() > 0.1


def test_tower_matches_hf_and_short_clip_embeddings_equal_padded(tiny_qwen2_audio_dir):
    path, hf = tiny_qwen2_audio_dir
    model = load_hf(path)
    _, _, features, feature_mask = make_batch(seed=1)
    from transformers.masking_utils import create_bidirectional_mask

    lengths = feature_mask.sum(-1)
    after_conv = (lengths - 1) // 2 + 1
    key_mask = (np.arange(1500)[None] < after_conv[:, None]).astype(np.int64)
    with torch.no_grad():
        hf_mask = create_bidirectional_mask(config=hf.config.audio_config,
                                            inputs_embeds=torch.zeros(2, 1500, 1),
                                            attention_mask=torch.tensor(key_mask))
        ref = hf.model.audio_tower(torch.tensor(features), attention_mask=hf_mask).last_hidden_state.numpy()
    padded = np.asarray(model.audio_tower(features, feature_mask))
    window = short_clip_frames(feature_mask)
    short = np.asarray(model.audio_tower(features[..., :window], feature_mask[:, :window]))
    assert short.shape == (2, window // FRAMES_PER_TOKEN, 32)
    for row, frames in enumerate(CLIP_FRAMES):
        real = num_audio_tokens(frames)
        assert np.abs(padded[row, :real] - ref[row, :real]).max() <= 1e-4
        assert np.abs(short[row, :real] - padded[row, :real]).max() <= 1e-5
    # Without the two frames past the last real one the last real embedding changes:
    # the window rule is what makes the short path exact.
    tight = np.asarray(model.audio_tower(features[..., :1000], feature_mask[:, :1000]))
    assert np.abs(tight[0, 249] - padded[0, 249]).max() > 1e-4


def test_lora_on_language_model_only_and_peft_export(tiny_qwen2_audio_dir, tmp_path):
    import peft

    path, hf = tiny_qwen2_audio_dir
    model = load_hf(path)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(0))
    names = [n for p, linear in lora.lora_layers(model) for n in layer_paths(p, linear.kernel)]
    assert len(names) == 2 * 7 and all(n.startswith("language_model.model.layers.") for n in names)
    for i, (_, linear) in enumerate(lora.lora_layers(model)):
        linear.lora.lora_b[...] = 0.05 * np.random.RandomState(i).randn(*linear.lora.lora_b[...].shape)
    ids, mask, features, feature_mask = make_batch()
    ours = np.asarray(model(input_ids=ids, attention_mask=mask, input_features=features,
                            feature_attention_mask=feature_mask))
    out = lora.export_peft(model, str(tmp_path / "adapter"))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(wrapped) == 14 and not any("audio_tower" in n for n in wrapped)
    ref = hf_logits(peft_model, ids, mask, features, feature_mask)
    base = hf_logits(hf, ids, mask, features, feature_mask)
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ours - base)[valid].max() > 1e-3


def test_audio_token_count_mismatch_is_an_error(tiny_qwen2_audio_dir):
    path, _ = tiny_qwen2_audio_dir
    model = load_hf(path)
    ids, mask, features, feature_mask = make_batch()
    ids[0, -1] = AUDIO_TOKEN  # one <|AUDIO|> too many
    with pytest.raises(ValueError, match=r"hold 334 <\|AUDIO\|> tokens .* gives 333 audio embeddings"):
        model(input_ids=ids, attention_mask=mask, input_features=features, feature_attention_mask=feature_mask)
    with pytest.raises(ValueError, match="multiple of 4 mel frames"):
        model.audio_tower(features[..., :1002], feature_mask[:, :1002])
    with pytest.raises(ValueError, match="need a feature_attention_mask"):
        model(input_ids=ids, attention_mask=mask, input_features=features)
