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
