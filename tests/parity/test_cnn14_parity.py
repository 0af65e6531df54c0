"""Our Cnn14, loaded through `load_pann`, vs panns-inference 0.1.1's PyTorch `Cnn14` (float32, eval mode).

Full-size models (both presets, ~81M parameters each) with random weights and random
but non-trivial BatchNorm statistics; two waveform lengths each, kept short (1 s and
1.37 s) so the test stays fast on 2 CPU cores without shrinking the model it checks.
Measured on a 2-core CPU: max |diff| clipwise_output ~6e-6, embedding ~3e-5 (embedding
values up to ~8); the bound is 1e-4.
"""
import os
from functools import partial

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from panns_reference import panns_models

from distill_jax.convert import load_pann
from distill_jax.models.cnn14 import Cnn14Config

TOLERANCE = 1e-4
PANN_ARGS = {  # panns_inference's Cnn14 constructor arguments (its config.py / the checkpoints' names)
    "cnn14_32k": dict(sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=14000,
                      classes_num=527),
    "cnn14_16k": dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50, fmax=8000,
                      classes_num=527),
}


def randomize_batch_norms(model: torch.nn.Module, calibration: torch.Tensor, seed: int) -> None:
    """Running statistics = the activations' own per-channel statistics, perturbed (mean +- 0.2 std,
    variance x U(0.5, 1.5)), and random affine weights, set layer by layer during one eval pass,
    so every BatchNorm is far from the identity yet activations stay O(1) through 13 of them."""
    generator = torch.Generator().manual_seed(seed)

    def hook(bn, inputs):
        x = inputs[0]
        dims = [0, 2, 3]
        mean, var = x.mean(dims), x.var(dims)
        shape = mean.shape
        bn.running_mean.copy_(mean + 0.2 * var.sqrt() * torch.randn(shape, generator=generator))
        bn.running_var.copy_(var * (0.5 + torch.rand(shape, generator=generator)))
        bn.weight.data.copy_(0.5 + torch.rand(shape, generator=generator))
        bn.bias.data.copy_(0.2 * torch.randn(shape, generator=generator))

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(calibration)
    for h in hooks:
        h.remove()


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, waveform):
    return nnx.merge(graphdef, state)(waveform)


@pytest.mark.parametrize("preset", ["cnn14_32k", "cnn14_16k"])
def test_cnn14_matches_panns(preset, tmp_path):
    args = PANN_ARGS[preset]
    sr = args["sample_rate"]
    torch.manual_seed(0)
    ref = panns_models().Cnn14(**args).eval()
    rng = np.random.RandomState(0)
    randomize_batch_norms(ref, torch.tensor(0.1 * rng.randn(2, sr), dtype=torch.float32), seed=1)
    path = str(tmp_path / f"{preset}.pth")
    torch.save({"model": ref.state_dict(), "iteration": 0}, path)

    ours = load_pann(path)  # config inferred from the state dict
    assert ours.config == Cnn14Config.preset(preset)
    graphdef, state = nnx.split(ours)
    for length in (sr, int(1.37 * sr)):
        waveform = (0.1 * rng.randn(2, length)).astype(np.float32)
        with torch.no_grad():
            expected = ref(torch.tensor(waveform))
        got = _forward(graphdef, state, waveform)
        for key in ("clipwise_output", "embedding"):
            want = expected[key].numpy()
            diff = float(np.max(np.abs(np.asarray(got[key]) - want)))
            print(f"{preset} {length} samples {key}: max |diff| {diff:.2e} (|ref| max {np.abs(want).max():.3f})")
            assert diff <= TOLERANCE, (preset, length, key, diff)
        probs = expected["clipwise_output"].numpy()
        assert probs.std() > 0.05 and 0.05 < np.median(probs) < 0.95  # not saturated: the diff means something

    # The safetensors copy holds the same numbers and loads without torch.
    copy = str(tmp_path / f"{preset}.safetensors")
    assert os.path.exists(copy)
    again = load_pann(copy)
    assert again.config == ours.config
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.state(ours, (nnx.Param, nnx.BatchStat)),
                        nnx.state(again, (nnx.Param, nnx.BatchStat)))
    assert all(jax.tree.leaves(same))
