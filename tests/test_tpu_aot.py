"""TPU without a TPU: programs compiled for TPU slices by libtpu (skipped where it is not installed).

CI does not install libtpu (the 7B compiles take minutes each on 2 cores); install it with
`pip install "jax[tpu]==<jax version>"` and run `pytest -m slow tests/test_tpu_aot.py` for the
paper-scale check.
"""
import dataclasses

import jax
import pytest

from configs import paper
from distill_jax import aot

pytestmark = pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu is not installed")


def _tiny(workload):
    """A preset's workload at tiny size: tiny models, and video and prompts they can hold."""
    return dataclasses.replace(workload, model="tiny", video_frames=2, video_patches=64,
                               prompt_length=min(workload.prompt_length, 512))


@pytest.mark.parametrize("program", sorted(aot.PROGRAMS))
def test_tiny_programs_compile_for_v5e_8(program):
    """The machinery at tiny size: sharded over the 8 chips, memory and FLOPs reported."""
    workload = _tiny(aot.workloads(paper.get_config("topology=v5e-8"))[program])
    result = aot.PROGRAMS[program](aot.TOPOLOGIES["v5e-8"], workload)
    assert result.argument_bytes > 0 and result.flops > 0 and result.model_flops > 0
    assert result.fits and result.argument_bytes <= result.peak_bytes < 2 * aot.GIB


def test_bigger_batch_needs_more_memory():
    small = dataclasses.replace(aot.Workload(mesh=(1, 8, 1), batch_size=8, remat="none"), model="tiny")
    big = dataclasses.replace(small, batch_size=64)
    topology = aot.TOPOLOGIES["v5e-8"]
    assert aot.audio_distill_step(topology, big).temp_bytes > aot.audio_distill_step(topology, small).temp_bytes


@pytest.mark.slow
@pytest.mark.parametrize("program", sorted(aot.PROGRAMS))
def test_v5e_8_presets_fit_16_gib_per_chip(program):
    """configs/paper.py's v5e-8 preset: the 7B programs fit a v5e chip's 16 GiB, video at the largest
    shape the paper config's buckets allow (10 temporal patches of 3072 patches, a 7,936-token prompt)."""
    workload = aot.workloads(paper.get_config("topology=v5e-8"))[program]
    if program != "distill":
        assert (workload.video_frames, workload.video_patches) == (10, 3072) and workload.prompt_length % 128 == 0
    # As a run compiles it: conftest's "highest" matmul precision would turn flash attention off.
    with jax.default_matmul_precision("default"):
        result = aot.PROGRAMS[program](aot.TOPOLOGIES["v5e-8"], workload)
    assert result.topology.hbm_gib == 16
    assert result.fits, f"{result.program}: {result.peak_bytes / aot.GIB:.2f} GiB per chip > 16 GiB"
    assert result.argument_bytes > 1 * aot.GIB  # really the 7B weights (sharded 8 ways: ~2 GiB a chip)


def test_tiny_int8_programs_compile_for_one_chip():
    """configs/paper.py's v5e-1 preset at tiny size: one chip, int8 kernels hold fewer bytes than bf16."""
    workloads = aot.workloads(paper.get_config("topology=v5e-1"))
    for program in ("distill", "score"):
        workload = _tiny(workloads[program])
        assert workload.quantize == "int8" and workload.mesh == (1, 1, 1)
        int8 = aot.PROGRAMS[program](aot.TOPOLOGIES["v5e-1"], workload)
        bf16 = aot.PROGRAMS[program](aot.TOPOLOGIES["v5e-1"], dataclasses.replace(workload, quantize=None))
        assert int8.fits and int8.argument_bytes < bf16.argument_bytes


@pytest.mark.slow
@pytest.mark.parametrize("program", ["distill", "score"])
def test_v5e_1_int8_preset_fits_one_16_gib_chip(program):
    """configs/paper.py's v5e-1 preset: Qwen2-Audio-7B's distill step and Qwen2-VL-7B's scoring step,
    int8 frozen weights, fit one v5e chip (bf16 weights alone would not: 16.8 GB for Qwen2-Audio-7B)."""
    workload = aot.workloads(paper.get_config("topology=v5e-1"))[program]
    with jax.default_matmul_precision("default"):
        result = aot.PROGRAMS[program](aot.TOPOLOGIES["v5e-1"], workload)
    assert result.fits, f"{result.program}: {result.peak_bytes / aot.GIB:.2f} GiB > 16 GiB"
    assert result.argument_bytes > 7 * aot.GIB  # the 7B weights, int8, on the one chip
