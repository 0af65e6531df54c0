"""Read PyTorch `.pth` files without executing pickled code, with or without torch.

`read_pth(path)` returns the saved object with every tensor as a NumPy array. With
torch installed it is `torch.load(path, weights_only=True)` (torch's restricted
unpickler); without torch (`reader="restricted"` forces it) it is our own unpickler
that resolves only tensor-rebuild functions, storage types and OrderedDict, for both
of torch's formats: the zip archive (torch >= 1.6) and the legacy stream of pickles
(`_use_new_zipfile_serialization=False`, torch < 1.6, e.g. PANN's 2019-2020
checkpoints). Any other global in the pickle is refused with an error naming it.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafeCheckpointError(ValueError):
    """The file pickles something other than tensors and plain containers (refused, never executed)."""


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage read from the file (zip: at once; legacy: after the main pickle)."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel, self.data = dtype, numel, None


class _TensorRef:
    """A tensor whose storage may not be read yet; `materialize` makes the NumPy array."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def materialize(self, where: str) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise ValueError(f"{where}: a tensor's storage is missing from the file")
        if not self.size:
            return np.array(data[self.offset])
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or len(self.size) != len(self.stride):
            raise ValueError(f"{where}: corrupt tensor (size {self.size}, stride {self.stride})")
        if 0 in self.size:
            return np.zeros(self.size, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= data.size:
            raise ValueError(f"{where}: tensor (offset {self.offset}, size {self.size}, stride {self.stride}) "
                             f"reads past its storage of {data.size} elements")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=[s * data.itemsize for s in self.stride], writeable=False)
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, load_storage):
        super().__init__(file)
        self.path, self.load_storage = path, load_storage

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"{self.path}: refusing to unpickle {module}.{name}: the file holds an object that is not a tensor "
            "or a plain container (dict, list, tuple, number, string); only weights can be loaded")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self.path}: unsupported persistent id {pid!r:.80}")
        return self.load_storage(pid)


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a PyTorch zip checkpoint (no single data.pkl among {names[:5]})")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and archive.read(prefix + "byteorder").decode().strip() != "little":
            raise ValueError(f"{path}: big-endian PyTorch checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            if key not in storages:
                storage = _Storage(storage_type.dtype, numel)
                storage.data = np.frombuffer(archive.read(f"{prefix}data/{key}"), storage_type.dtype)
                storages[key] = storage
            return storages[key]

        return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, load_storage).load()


def _read_legacy(path: str) -> Any:
    def no_storage(pid):
        raise UnsafeCheckpointError(f"{path}: storage reference outside the main pickle")

    with open(path, "rb") as f:
        def plain():
            return _RestrictedUnpickler(f, path, no_storage).load()

        try:
            magic = plain()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            if isinstance(e, UnsafeCheckpointError):
                raise
            raise ValueError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy pickle: {e})")
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint (legacy magic number {magic!r:.40} is wrong)")
        protocol, sys_info = plain(), plain()
        if protocol != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy PyTorch protocol {protocol!r}")
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian legacy checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            if len(pid) > 5 and pid[5] is not None:
                raise ValueError(f"{path}: legacy storage views are not supported")
            storages.setdefault(key, _Storage(storage_type.dtype, numel))
            return storages[key]

        result = _RestrictedUnpickler(f, path, load_storage).load()
        keys = plain()
        for key in keys:
            if key not in storages:
                raise ValueError(f"{path}: storage {key!r} is listed but never referenced")
            storage = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * storage.dtype.itemsize)
            if len(raw) != numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: truncated (storage {key!r} needs {numel} elements)")
            storage.data = np.frombuffer(raw, storage.dtype)
    return result


def _materialize(obj, path: str, where: str = ""):
    if isinstance(obj, _TensorRef):
        return obj.materialize(f"{path}: {where or '<root>'}")
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v, path, f"{where}.{k}" if where else str(k))) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, path, f"{where}[{i}]") for i, v in enumerate(obj))
    return obj


def _from_torch(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _from_torch(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_torch(v) for v in obj)
    return obj


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def read_pth(path: str, *, reader: str = "auto") -> Any:
    """The object saved in `path` with tensors as NumPy arrays; never runs pickled code.

    reader: "torch" (torch.load(weights_only=True)), "restricted" (ours, no torch needed),
      or "auto" (torch when installed).

    Raises:
        UnsafeCheckpointError: the pickle references anything but tensors and containers.
        ValueError: not a PyTorch checkpoint, or corrupt.
    """
    if reader not in ("auto", "torch", "restricted"):
        raise ValueError(f"reader must be 'auto', 'torch' or 'restricted', got {reader!r}")
    if reader == "torch" or (reader == "auto" and _torch_available()):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = str(e).strip().splitlines()
            detail = next((line for line in lines if "GLOBAL" in line), None)
            if detail is None:  # e.g. garbage bytes: the weights-only unpickler fails on an opcode
                raise ValueError(f"{path}: not a readable PyTorch checkpoint ({lines[-1] if lines else e})") from None
            detail = detail.split(" was not an allowed global")[0].strip()
            raise UnsafeCheckpointError(
                f"{path}: refusing to unpickle it: the file holds an object that is not a tensor or a plain "
                f"container, which torch.load(weights_only=True) rejects ({detail})") from None
        except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... on files it cannot read
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
        return _from_torch(obj)
    if zipfile.is_zipfile(path):
        return _materialize(_read_zip(path), path)
    return _materialize(_read_legacy(path), path)


# ---------------------------------------------------------------------------------------------
# Writing (without torch)
# ---------------------------------------------------------------------------------------------

_STORAGE_OF = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items() if k != "BFloat16Storage"}


def _pickle_tensors(obj, storages: list[np.ndarray]) -> bytes:
    """Protocol-2 pickle of `obj` (str-keyed dicts, lists, numbers, strings, arrays) in torch's tensor
    encoding: each array is `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
    OrderedDict())` over a persistent storage id ("storage", torch.<Type>Storage, key, "cpu", numel).
    The opcodes are written out here because pickle's own Pickler would import torch to name them."""
    out = [pickle.PROTO + b"\x02"]

    def text(s: str) -> None:
        data = s.encode("utf-8")
        out.append(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

    def integer(n: int) -> None:
        out.append(pickle.BININT + struct.pack("<i", int(n)) if -2**31 <= n < 2**31 else
                   pickle.LONG1 + bytes([8]) + int(n).to_bytes(8, "little", signed=True))

    def ints(values) -> None:
        out.append(pickle.MARK)
        for v in values:
            integer(v)
        out.append(pickle.TUPLE)

    def save(x) -> None:
        if isinstance(x, np.ndarray):
            array = np.require(x, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
            if array.dtype not in _STORAGE_OF:
                raise ValueError(f"write_pth: no torch storage for dtype {array.dtype}")
            key = str(len(storages))
            storages.append(array)
            out.append(pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + pickle.MARK)
            out.append(pickle.MARK)
            text("storage")
            out.append(pickle.GLOBAL + f"torch\n{_STORAGE_OF[array.dtype]}\n".encode())
            text(key)
            text("cpu")
            integer(array.size)
            out.append(pickle.TUPLE + pickle.BINPERSID)
            integer(0)
            ints(array.shape)
            ints([s // array.itemsize for s in array.strides] if array.size else [1] * array.ndim)
            out.append(pickle.NEWFALSE)
            out.append(pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE)
            out.append(pickle.TUPLE + pickle.REDUCE)
        elif isinstance(x, dict):
            out.append(pickle.EMPTY_DICT + pickle.MARK)
            for k, v in x.items():
                if not isinstance(k, str):
                    raise ValueError(f"write_pth: dict keys must be str, got {k!r}")
                text(k)
                save(v)
            out.append(pickle.SETITEMS)
        elif isinstance(x, (list, tuple)):
            out.append(pickle.MARK)
            for v in x:
                save(v)
            out.append(pickle.TUPLE if isinstance(x, tuple) else pickle.LIST)
        elif isinstance(x, bool):
            out.append(pickle.NEWTRUE if x else pickle.NEWFALSE)
        elif isinstance(x, int):
            integer(x)
        elif isinstance(x, float):
            out.append(pickle.BINFLOAT + struct.pack(">d", x))
        elif isinstance(x, str):
            text(x)
        elif x is None:
            out.append(pickle.NONE)
        else:
            raise ValueError(f"write_pth: cannot write a {type(x).__name__}")

    save(obj)
    out.append(pickle.STOP)
    return b"".join(out)


def write_pth(path: str, obj: Any) -> str:
    """Save `obj` (e.g. {"model": state dict of NumPy arrays}) as torch.save's zip archive would,
    without torch: `torch.load(path, weights_only=True)` and `read_pth` read it back. Written to a
    temporary name, then renamed. The same `obj` gives the same bytes (entries dated 1980-01-01, not
    now), so every host of a slice that writes it holds the same file."""
    import os

    storages: list[np.ndarray] = []
    data = _pickle_tensors(obj, storages)
    prefix = os.path.splitext(os.path.basename(os.fspath(path)))[0] or "archive"
    tmp = os.fspath(path) + ".tmp"

    def entry(name):
        return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))

    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(entry(f"{prefix}/data.pkl"), data)
        archive.writestr(entry(f"{prefix}/byteorder"), "little")
        for key, array in enumerate(storages):
            archive.writestr(entry(f"{prefix}/data/{key}"), array.tobytes())
        archive.writestr(entry(f"{prefix}/version"), "3\n")
    os.replace(tmp, path)
    return os.fspath(path)
