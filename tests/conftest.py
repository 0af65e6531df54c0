"""Test session setup: 8 fake CPU devices, parsed absl flags, float32 matmuls.

XLA_FLAGS must be set before jax is first imported, so this runs at conftest
import time, ahead of every test module.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
from absl import flags  # noqa: E402

# Parity tests compare float32 numbers against PyTorch; keep XLA's CPU matmuls exact.
jax.config.update("jax_default_matmul_precision", "highest")

# Grain's multiprocessing workers read absl flags; tests never go through app.run.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
    assert jax.device_count() == 8, (
        f"expected 8 fake CPU devices, got {jax.devices()}: was jax imported before conftest?"
    )


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """Factory: a tiny random HF Qwen2ForCausalLM saved with save_pretrained -> (dir, torch model).

    Cached per distinct keyword set, so tests sharing a shape share the checkpoint.
    """
    import torch
    import transformers

    made = {}

    def make(*, tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2, seed=0,
             dtype=None, max_shard_size=None, **extra):
        key = (tie_word_embeddings, num_attention_heads, num_key_value_heads, seed, str(dtype),
               max_shard_size, tuple(sorted(extra.items())))
        if key not in made:
            config = transformers.Qwen2Config(
                vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                tie_word_embeddings=tie_word_embeddings, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra)
            torch.manual_seed(seed)
            model = transformers.Qwen2ForCausalLM(config).eval()
            # HF initialises biases to zero; random biases make the parity test see them.
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("bias") or "norm" in name:
                        p.add_(0.1 * torch.randn_like(p))
            path = tmp_path_factory.mktemp("qwen2")
            kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            if dtype is not None:
                model = model.to(dtype)
            model.save_pretrained(path, **kwargs)
            made[key] = (str(path), model.float().eval())
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_qwen2_audio_dir(tmp_path_factory):
    """A tiny random HF Qwen2AudioForConditionalGeneration (128 mel bins, full 1500 positions) -> (dir, model)."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("qwen2_audio")
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                          d_model=32, max_source_positions=1500),
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        audio_token_index=290)
    torch.manual_seed(0)
    model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits norms; random ones make parity see them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory):
    """A tiny random HF Qwen2VLForConditionalGeneration (image 290, video 291, vision start/end 292/293)."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("qwen2_vl")
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2),
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # random biases and norm scales, so parity sees them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny toy study (configs/toy.py:tiny=1), run once in this process: the uninterrupted
    reference of the study tests. Its fault points (distill_jax/faults.py) are logged to
    <workdir>.points, which the kill test draws from."""
    from configs import toy
    from distill_jax import main

    workdir = str(tmp_path_factory.mktemp("study"))
    os.environ["DISTILL_JAX_FAULT_LOG"] = workdir + ".points"
    try:
        main.run(toy.get_config("tiny=1"), workdir)
    finally:
        del os.environ["DISTILL_JAX_FAULT_LOG"]
    return workdir


OMNI_TOKENS = dict(audio=300, image=301, video=302, audio_start=303, audio_end=304, vision_start=305, vision_end=306)


def _omni_thinker_config():
    """A tiny Qwen2_5OmniThinkerConfig: 8-frame audio windows (16 mel frames), 2x2-merged-patch vision
    windows with full attention in blocks 1 and 3, M-RoPE sections (2, 3, 3)."""
    import transformers

    t = OMNI_TOKENS
    return transformers.Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                          d_model=32, output_dim=64, n_window=8, max_source_positions=1500),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                           window_size=56, fullatt_block_indexes=[1, 3]),
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        audio_token_index=t["audio"], image_token_index=t["image"], video_token_index=t["video"],
        audio_start_token_id=t["audio_start"], audio_end_token_id=t["audio_end"],
        vision_start_token_id=t["vision_start"], vision_end_token_id=t["vision_end"])


@pytest.fixture(scope="session")
def tiny_qwen2_5_omni_dir(tmp_path_factory):
    """A tiny random HF Qwen2_5OmniThinkerForConditionalGeneration (ids in conftest.OMNI_TOKENS) -> (dir, model)."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("qwen2_5_omni_thinker")
    torch.manual_seed(0)
    model = transformers.Qwen2_5OmniThinkerForConditionalGeneration(_omni_thinker_config()).eval()
    with torch.no_grad():  # random biases and norm scales, so parity sees them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="session")
def tiny_qwen2_5_omni_full_dir(tmp_path_factory, tiny_qwen2_5_omni_dir):
    """The same thinker inside a full Qwen2_5OmniForConditionalGeneration (tiny talker and token2wav),
    saved as the hub's Qwen/Qwen2.5-Omni-7B is: `thinker.`, `talker.`, `token2wav.` keys."""
    import torch
    import transformers

    t = OMNI_TOKENS
    talker = dict(vocab_size=400, embedding_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, audio_token_index=t["audio"],
                  image_token_index=t["image"], video_token_index=t["video"],
                  audio_start_token_id=t["audio_start"], audio_end_token_id=t["audio_end"],
                  vision_start_token_id=t["vision_start"], vision_end_token_id=t["vision_end"],
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    token2wav = dict(
        dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ff_mult=1, emb_dim=16, head_dim=16,
                        repeats=1, num_embeds=64, mel_dim=16, enc_emb_dim=16, enc_dim=16,
                        enc_channels=[16, 16, 16, 16, 32], enc_kernel_sizes=[5, 3, 3, 3, 1],
                        enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=8, enc_res2net_scale=2,
                        enc_se_channels=8),
        bigvgan_config=dict(mel_dim=16, upsample_initial_channel=16, resblock_kernel_sizes=[3],
                            resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4]))
    config = transformers.Qwen2_5OmniConfig(thinker_config=_omni_thinker_config().to_dict(), talker_config=talker,
                                            token2wav_config=token2wav)
    torch.manual_seed(1)
    full = transformers.Qwen2_5OmniForConditionalGeneration(config).eval()
    full.thinker.load_state_dict(tiny_qwen2_5_omni_dir[1].state_dict())
    path = tmp_path_factory.mktemp("qwen2_5_omni_full")
    full.save_pretrained(path)
    return str(path)
