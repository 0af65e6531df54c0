"""A lazy safetensors reader: memory-mapped tensors, so a shard reads only its slice.

Reads single files and sharded checkpoints (`model.safetensors.index.json`).
bfloat16 tensors come back as ml_dtypes.bfloat16 arrays (numpy has no bf16).
The format: 8-byte little-endian header size, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw little-endian bytes.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`


def _read_header(file: str) -> dict[str, TensorInfo]:
    """The tensors of one file; a byte range past the end of the file (a cut download) names the
    file and the first tensor it cuts."""
    file_size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file}: not a safetensors file (shorter than its 8-byte header size)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from e
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        dtype = np.dtype(_DTYPES[meta["dtype"]])
        shape = tuple(meta["shape"])
        if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{file}: tensor {name!r} byte range does not match its shape {shape}")
        infos[name] = TensorInfo(file, dtype, shape, 8 + size + start)
    available = file_size - 8 - size
    cut = sorted((meta["data_offsets"][1], name) for name, meta in header.items()
                 if name != "__metadata__" and meta["data_offsets"][1] > available)
    if cut:
        end, name = min(cut, key=lambda c: header[c[1]]["data_offsets"][0])
        raise ValueError(f"{file}: truncated ({file_size} bytes): tensor {name!r} needs data bytes "
                         f"{header[name]['data_offsets'][0]}..{end} but the file holds {max(available, 0)}; "
                         f"{len(cut)} tensors cut (an interrupted download or copy?)")
    return infos


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
        for file in files:
            if not os.path.exists(file):
                raise FileNotFoundError(f"{file}: listed in the checkpoint index but missing")
            for name, info in _read_header(file).items():
                if name in self.tensors:
                    raise ValueError(f"tensor {name!r} appears in both {self.tensors[name].file} and {file}")
                self.tensors[name] = info
        self._maps: dict[str, np.memmap] = {}

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def get(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view; slicing it reads only the slice from disk."""
        info = self.tensors[key]
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        buf = self._maps[info.file]
        nbytes = info.dtype.itemsize * int(np.prod(info.shape, dtype=np.int64))
        return buf[info.offset:info.offset + nbytes].view(info.dtype).reshape(info.shape)
