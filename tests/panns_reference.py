"""PANNs' PyTorch Cnn14, the reference for parity tests and benchmarks.

`import panns_inference` runs `wget` at import (DESIGN.md), so its `models.py` is loaded by
file path under a stand-in package (its relative imports then resolve), once per process.
"""
from __future__ import annotations

import importlib.util
import os
import site
import sys
import types


def panns_models():
    """panns_inference/models.py as a module (cached in sys.modules)."""
    if "_panns_reference.models" in sys.modules:
        return sys.modules["_panns_reference.models"]
    folder = next(os.path.join(p, "panns_inference") for p in site.getsitepackages() + [site.getusersitepackages()]
                  if os.path.exists(os.path.join(p, "panns_inference", "models.py")))
    package = types.ModuleType("_panns_reference")  # lets models.py's `from .pytorch_utils import` resolve
    package.__path__ = [folder]
    sys.modules["_panns_reference"] = package
    spec = importlib.util.spec_from_file_location("_panns_reference.models", os.path.join(folder, "models.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["_panns_reference.models"] = module
    spec.loader.exec_module(module)
    return module
