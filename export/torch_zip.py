"""torch's zip checkpoint format (`torch.save` since 1.6), read and written without torch.

Upstream ships Vocos's weights as `assets/Vocos.pt`, a state dict that `torch.load(weights_only=True)`
reads. The exporter must read it, and the synthetic checkpoints must write it, without torch (the
export extra has none). The format is a stored (uncompressed) zip holding

    <archive>/data.pkl      pickle (protocol 2) of the state dict: an OrderedDict of name ->
                            torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})
                            where storage is a persistent id ('storage', torch.FloatStorage, key,
                            'cpu', numel)
    <archive>/data/<key>    each storage's raw little-endian bytes, 64-byte aligned
    <archive>/byteorder     "little"
    <archive>/version       "3"

The writer emits the pickle opcodes itself (the names are torch's, which pickle can only reference
through importable objects); the reader runs a restricted unpickler that knows only those names.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
             "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
_STORAGE_OF = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
               np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
               np.dtype(np.int32): "IntStorage", np.dtype(np.int8): "CharStorage",
               np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}
_ALIGN = 64


class TorchZipError(ValueError):
    """The file is not a torch zip checkpoint this reader understands."""


# ---------------------------------------------------------------- writing

def _unicode(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    return b"J" + struct.pack("<i", v)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def state_dict_pickle(tensors: dict[str, np.ndarray]) -> bytes:
    """The data.pkl bytes of a state dict whose tensor i is storage key str(i)."""
    out = [b"\x80\x02", _global("collections", "OrderedDict"), b")R", b"("]
    for i, (name, array) in enumerate(tensors.items()):
        storage = _STORAGE_OF.get(array.dtype)
        if storage is None:
            raise TorchZipError(f"tensor '{name}': dtype {array.dtype} has no torch storage here")
        persistent = _tuple([_unicode("storage"), _global("torch", storage), _unicode(str(i)), _unicode("cpu"),
                             _int(array.size)]) + b"Q"
        strides = [int(np.prod(array.shape[d + 1:])) for d in range(array.ndim)]
        args = _tuple([persistent, _int(0), _tuple([_int(d) for d in array.shape]),
                       _tuple([_int(s) for s in strides]), b"\x89", _global("collections", "OrderedDict") + b")R"])
        out += [_unicode(name), _global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
    out += [b"u", b"."]
    return b"".join(out)


def save_state_dict(path: str | Path, tensors: dict[str, np.ndarray], archive: str = "archive") -> None:
    """Write `tensors` (C-contiguous numpy arrays) as `torch.save(state_dict, path)` would."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    records = [("data.pkl", state_dict_pickle(tensors)), ("byteorder", b"little")]
    records += [(f"data/{i}", a.astype(a.dtype.newbyteorder("<")).tobytes()) for i, a in enumerate(tensors.values())]
    records += [("version", b"3\n")]
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in records:
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            # pad the local header's extra field so the data starts on a 64-byte boundary, as torch does
            header = 30 + len(info.filename.encode())
            pad = -(f.tell() + header + 4) % _ALIGN
            info.extra = struct.pack("<HH", 0xCAFE, pad) + b"\0" * pad  # an unassigned extra-field id
            z.writestr(info, data)


# ---------------------------------------------------------------- reading

class _Storage:
    def __init__(self, dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_ignored) -> np.ndarray:
    if not size:
        return storage[offset].copy()
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view)


class _Unpickler(pickle.Unpickler):
    """Knows only the names a state dict uses; anything else is refused (as weights_only does)."""

    def __init__(self, data: bytes, read_record):
        super().__init__(io.BytesIO(data))
        self._read = read_record

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _Storage(_STORAGES[name])
        raise TorchZipError(f"data.pkl refers to {module}.{name}, which a state dict does not hold")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchZipError(f"unknown persistent id {pid!r}")
        _, storage, key, _location, numel = pid
        raw = self._read(f"data/{key}")
        if storage.dtype == "bfloat16":  # bf16 is the upper half of a float32
            return np.left_shift(np.frombuffer(raw, "<u2").astype(np.uint32), 16).view(np.float32)[:numel]
        return np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))[:numel]


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a torch zip checkpoint holding a flat state dict: {name: numpy array} (bf16 as float32)."""
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise TorchZipError(f"{path}: not a torch zip checkpoint ({e})") from None
    with z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise TorchZipError(f"{path}: no single data.pkl record (a legacy, pre-1.6 torch file?)")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            obj = _Unpickler(z.read(pkl[0]), lambda name: z.read(prefix + name)).load()
        except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as e:
            if isinstance(e, TorchZipError):
                raise TorchZipError(f"{path}: {e}") from None
            raise TorchZipError(f"{path}: unreadable data.pkl ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise TorchZipError(f"{path}: not a flat state dict of tensors")
    return dict(obj)
