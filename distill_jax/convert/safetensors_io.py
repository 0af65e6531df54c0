"""Checkpoint files through `safetensors.safe_open`: lazy, so a device shard reads only its slice.

Reads single files and sharded checkpoints (`model.safetensors.index.json`). `read(key, index)`
is `safe_open(...).get_slice(key)[index]` (the stored layout's slice, nothing else read);
`get(key)` the whole tensor. bfloat16 tensors come back as ml_dtypes.bfloat16 arrays.

safe_open refuses a truncated file with "incomplete metadata, file not fully covered"; that
case alone reads the JSON header here, to name the first tensor the cut reaches (an
interrupted download or copy is then plain to see).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]


def _header(file: str) -> tuple[int, dict]:
    """(its byte size, the raw JSON header) of a safetensors file: names, dtypes, shapes, byte
    ranges, __metadata__."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file}: not a safetensors file (shorter than its 8-byte header size)")
        (size,) = struct.unpack("<Q", raw)
        try:
            return size, json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from e


def _explain(file: str, error: SafetensorError) -> ValueError:
    """safe_open's refusal, with the first tensor a cut reaches when the file is truncated."""
    size, meta = _header(file)
    file_size = os.path.getsize(file)
    available = file_size - 8 - size
    cut = sorted((m["data_offsets"][0], m["data_offsets"][1], name) for name, m in meta.items()
                 if name != "__metadata__" and m["data_offsets"][1] > available)
    if not cut:
        return ValueError(f"{file}: not a readable safetensors file ({error})")
    start, end, name = cut[0]
    return ValueError(f"{file}: truncated ({file_size} bytes): tensor {name!r} needs data bytes {start}..{end} but "
                      f"the file holds {max(available, 0)}; {len(cut)} tensors cut (an interrupted download or copy?)")


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory (or one .safetensors file), read lazily."""

    def __init__(self, path: str):
        if os.path.isfile(path):
            files = [path]
        else:
            index = os.path.join(path, "model.safetensors.index.json")
            single = os.path.join(path, "model.safetensors")
            if os.path.exists(index):
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted({os.path.join(path, v) for v in weight_map.values()})
            elif os.path.exists(single):
                files = [single]
            else:
                raise FileNotFoundError(
                    f"{path}: no model.safetensors or model.safetensors.index.json")
        self.tensors: dict[str, TensorInfo] = {}
        self._files = {}
        for file in files:
            if not os.path.exists(file):
                raise FileNotFoundError(f"{file}: listed in the checkpoint index but missing")
            try:
                handle = safe_open(file, framework="np")
            except SafetensorError as e:
                raise _explain(file, e) from e
            self._files[file] = handle
            for name in handle.keys():
                tensor = handle.get_slice(name)
                if tensor.get_dtype() not in _DTYPES:
                    raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {tensor.get_dtype()}")
                if name in self.tensors:
                    raise ValueError(f"tensor {name!r} appears in both {self.tensors[name].file} and {file}")
                self.tensors[name] = TensorInfo(file, np.dtype(_DTYPES[tensor.get_dtype()]), tuple(tensor.get_shape()))

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def nbytes(self, key: str) -> int:
        return self.tensors[key].dtype.itemsize * int(np.prod(self.tensors[key].shape, dtype=np.int64))

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` of its files (string to string), merged."""
        merged = {}
        for handle in self._files.values():
            merged.update(handle.metadata() or {})
        return merged

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]` in the stored layout; only those bytes are read."""
        return self._files[self.tensors[key].file].get_slice(key)[index]

    def get(self, key: str) -> np.ndarray:
        """The whole tensor."""
        return self._files[self.tensors[key].file].get_tensor(key)
