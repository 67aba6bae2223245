"""Read PyTorch checkpoints without torch and without running any code from the file.

Three container formats are understood:

* ``torch-zip``: what ``torch.save`` writes since torch 1.6, a zip archive holding
  ``<prefix>/data.pkl`` (the object pickle), ``<prefix>/data/<key>`` (one raw storage each) and
  ``<prefix>/byteorder``;
* ``torch-legacy``: the pre-1.6 stream (``_use_new_zipfile_serialization=False``): pickles of the
  magic number, the protocol version and a sys-info dict, then the object pickle, then a pickled
  list of storage keys followed by each storage as an int64 element count and its raw bytes;
* ``safetensors``: read with the `safetensors` package.

Pickles are read with a restricted :class:`pickle.Unpickler` whose ``find_class`` resolves only an
allow-list of names to *our own* inert stand-ins (tensors are rebuilt from the raw storages with
numpy); every other global is refused before anything is called, with an error naming it.

Why a reader of our own for the torch containers: `torch.load` needs torch, a multi-GB dependency
rat_jax otherwise has no use for, and runs the pickle's code unless `weights_only=True`. This
reader needs no torch, reads the legacy (pre-1.6) stream as well as the zip container, and runs
nothing from the file, so fine-tunings downloaded from others are safe to load.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

__all__ = [
    "CheckpointFormatError", "UnsafePickleError", "detect_format", "load_torch_object",
    "read_torch_file", "flatten_state_dict", "canonicalize_state_dict",
]


class CheckpointFormatError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt, unknown or unsupported."""


class UnsafePickleError(CheckpointFormatError):
    """A pickle that names a global outside the allow-list (it could run code when loaded)."""


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("float64"),
    "FloatStorage": np.dtype("float32"),
    "HalfStorage": np.dtype("float16"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("int64"),
    "IntStorage": np.dtype("int32"),
    "ShortStorage": np.dtype("int16"),
    "CharStorage": np.dtype("int8"),
    "ByteStorage": np.dtype("uint8"),
    "BoolStorage": np.dtype("bool"),
    "ComplexFloatStorage": np.dtype("complex64"),
    "ComplexDoubleStorage": np.dtype("complex128"),
    "UntypedStorage": np.dtype("uint8"),
}

# torch dtype globals (``torch.float32`` ...) as they appear in ``_rebuild_tensor_v3``.
_TORCH_DTYPES = {
    "float64": np.dtype("float64"), "double": np.dtype("float64"),
    "float32": np.dtype("float32"), "float": np.dtype("float32"),
    "float16": np.dtype("float16"), "half": np.dtype("float16"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int64": np.dtype("int64"), "long": np.dtype("int64"),
    "int32": np.dtype("int32"), "int": np.dtype("int32"),
    "int16": np.dtype("int16"), "short": np.dtype("int16"),
    "int8": np.dtype("int8"), "uint8": np.dtype("uint8"),
    "uint16": np.dtype("uint16"), "uint32": np.dtype("uint32"), "uint64": np.dtype("uint64"),
    "bool": np.dtype("bool"),
    "complex64": np.dtype("complex64"), "complex128": np.dtype("complex128"),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# pickle protocol 2 header + LONG1 of the legacy magic number.
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")


# ----------------------------------------------------------------------------------------------
# inert stand-ins that the restricted unpickler hands out instead of torch objects
# ----------------------------------------------------------------------------------------------
class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co: carries only the dtype."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


class _TorchDType:
    """Stands in for ``torch.float32`` & co."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    """A storage: a dtype and raw bytes (filled in later for the legacy format)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, int(numel)
        self.data: bytes | memoryview | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def buffer(self) -> memoryview:
        if self.data is None:
            raise CheckpointFormatError(f"storage {self.key!r} has no data (truncated or corrupt file)")
        return memoryview(self.data)


class _StorageView:
    """A legacy-format view ``root[offset:offset + numel]`` (in elements of the root dtype)."""

    def __init__(self, root: _Storage, offset: int, numel: int):
        self.root, self.offset, self.numel = root, int(offset), int(numel)
        self.dtype = root.dtype
        self.key = f"{root.key}[{offset}:{offset + numel}]"

    def buffer(self) -> memoryview:
        start = self.offset * self.dtype.itemsize
        buf = self.root.buffer()[start:start + self.numel * self.dtype.itemsize]
        if len(buf) != self.numel * self.dtype.itemsize:
            raise CheckpointFormatError(f"storage view {self.key} lies outside its storage (corrupt file)")
        return buf


class _LazyTensor:
    """A tensor to be built from its storage once every storage has been read."""

    def __init__(self, storage, offset, size, stride, dtype=None):
        if not isinstance(storage, (_Storage, _StorageView)):
            raise CheckpointFormatError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
        self.storage, self.offset = storage, _as_int(offset, "storage offset")
        self.size = tuple(_as_int(s, "size") for s in size)
        self.stride = tuple(_as_int(s, "stride") for s in stride)
        if len(self.size) != len(self.stride):
            raise CheckpointFormatError(f"tensor size {self.size} and stride {self.stride} differ in rank")
        self.dtype = storage.dtype if dtype is None else dtype

    def materialize(self, byteorder: str) -> np.ndarray:
        dtype = self.dtype.newbyteorder(">" if byteorder == "big" else "<") \
            if self.dtype.itemsize > 1 and self.dtype.kind in "biufc" else self.dtype
        buf = self.storage.buffer()
        item = dtype.itemsize
        if len(buf) % item:
            raise CheckpointFormatError(f"storage {self.storage.key}: {len(buf)} bytes is not a "
                                        f"multiple of {dtype} ({item} bytes)")
        flat = np.frombuffer(buf, dtype=dtype)
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise CheckpointFormatError(f"negative size/stride/offset in tensor of storage {self.storage.key}")
        if 0 in self.size:
            out = np.zeros(self.size, dtype)
        else:
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if last >= flat.size:
                raise CheckpointFormatError(
                    f"tensor (size {self.size}, stride {self.stride}, offset {self.offset}) reads past "
                    f"the end of storage {self.storage.key} ({flat.size} elements): corrupt file")
            out = np.lib.stride_tricks.as_strided(
                flat[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride),
                writeable=False)
        out = np.array(out, order="C", copy=True)  # contiguous, owns its memory
        if out.dtype.byteorder not in ("=", "|") and out.dtype.byteorder != _NATIVE:
            out = out.astype(out.dtype.newbyteorder("="))
        return out


_NATIVE = "<" if np.little_endian else ">"


def _as_int(x, what):
    if isinstance(x, bool) or not isinstance(x, int):
        raise CheckpointFormatError(f"tensor {what} is a {type(x).__name__}, not an int")
    return x


# -- tensor rebuild functions (our versions of torch._utils._rebuild_*) --------------------------
def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, _TorchDType):
        raise CheckpointFormatError(f"_rebuild_tensor_v3 with dtype {dtype!r}")
    return _LazyTensor(storage, storage_offset, size, stride, dtype=dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, _LazyTensor):
        raise CheckpointFormatError("Parameter rebuilt from something that is not a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data, requires_grad, backward_hooks)


class _TypeMarker:
    """Stands in for a class name that only labels a tensor (``torch.nn.parameter.Parameter``)."""

    def __init__(self, name):
        self.name = name


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                    _rebuild_parameter_with_state):
        raise CheckpointFormatError(f"_rebuild_from_type_v2 with function {func!r}")
    return func(*args)


# -- plain-data helpers ----------------------------------------------------------------------------
class Namespace:
    """Inert stand-in for ``argparse.Namespace``: attributes set from the pickled ``__dict__``."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __repr__(self):
        return f"Namespace({self.__dict__!r})"


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # protocol-2 pickles spell ``bytes`` objects as _codecs.encode(str, 'latin1').
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}; nothing was executed")
    return str(text).encode(encoding, errors)


_SAFE_DTYPE_SPEC = re.compile(r"^[<>|=]?(?:[?biufc][0-9]{0,2}|[biufc]{0,1}(?:int|float|bool)[0-9]{0,3})$")


def _numpy_dtype(spec, align=False, copy=True):
    if not isinstance(spec, str) or not _SAFE_DTYPE_SPEC.match(spec):
        raise UnsafePickleError(f"refused numpy.dtype({spec!r}): only plain numeric dtypes are allowed; "
                                "nothing was executed")
    return _DTypeBox(np.dtype(spec))


class _DTypeBox:
    """Holds a numpy dtype; takes (and applies only the byte order of) numpy's dtype BUILD state."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "=", "|"):
            if self.dtype.itemsize > 1:
                self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
    dt = dtype.dtype if isinstance(dtype, _DTypeBox) else None
    if dt is None or dt.kind not in "?biufc" or not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("refused numpy scalar that is not plain numeric; nothing was executed")
    if len(data) != dt.itemsize:
        raise CheckpointFormatError("numpy scalar with the wrong number of bytes")
    return np.frombuffer(bytes(data), dtype=dt)[0].item()


def _torch_size(*args):
    return tuple(*args)


def _torch_device(*args):
    return ":".join(str(a) for a in args)


def _get_layout(name):
    return str(name)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _codecs_encode,
        ("argparse", "Namespace"): Namespace,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.parameter.Parameter"),
        ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("torch.serialization", "_get_layout"): _get_layout,
        ("numpy", "dtype"): _numpy_dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    }
    for builtin in (set, frozenset, complex, bytearray):
        allowed[("builtins", builtin.__name__)] = builtin
    for fn in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
               _rebuild_parameter_with_state):
        allowed[("torch._utils", fn.__name__)] = fn
    for name, dt in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dt)
        allowed[("torch.storage", name)] = _StorageType(name, dt)
    for name, dt in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _TorchDType(name, dt)
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python one: its BUILD can be replaced
    """Resolves only allow-listed globals, to inert stand-ins; storages come from ``storages``.

    BUILD (``__setstate__``) is allowed only on fresh OrderedDicts (a state_dict's ``_metadata``),
    Namespaces and numpy dtypes, so a file cannot alter the shared stand-ins or function objects.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _DTypeBox):
            inst.__setstate__(state)
            return
        if type(inst) in (collections.OrderedDict, Namespace):
            slotstate = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slotstate = state
            for d in (state, slotstate):
                if d is None:
                    continue
                if not isinstance(d, dict):
                    raise CheckpointFormatError(f"{self._what}: malformed object state")
                for k, v in d.items():
                    if not isinstance(k, str) or k.startswith("__"):
                        raise UnsafePickleError(f"{self._what}: refused to set attribute {k!r}; "
                                                "nothing was executed")
                    inst.__dict__[k] = v
            return
        raise UnsafePickleError(f"{self._what}: refused to set the state of a {type(inst).__name__} "
                                "object (only plain data is read); nothing was executed")

    dispatch[pickle.BUILD[0]] = load_build

    def __init__(self, file, storages: dict[str, _Storage] | None, legacy: bool, what: str):
        super().__init__(file, encoding="utf-8")
        self._storages = storages
        self._legacy = legacy
        self._what = what
        self._views: dict[str, _StorageView] = {}

    def find_class(self, module, name):
        if self.proto < 3 and (module, name) in _compat_pickle.NAME_MAPPING:  # py2 names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif self.proto < 3 and module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._what}: refused to load global '{module}.{name}': it is not plain tensor data "
                "and could run code when unpickled. Nothing from the file was executed. Save a "
                "state_dict (tensors in dicts) instead of whole objects.") from None

    def persistent_load(self, pid):
        if self._storages is None:
            raise CheckpointFormatError(f"{self._what}: unexpected persistent id in a pickle without storages")
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointFormatError(f"{self._what}: malformed persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise UnsafePickleError(f"{self._what}: refused persistent id of kind {kind!r} (only tensor "
                                    "storages are read; whole modules are not). Nothing was executed.")
        if self._legacy:
            if len(pid) != 6:
                raise CheckpointFormatError(f"{self._what}: malformed storage id {pid!r}")
            _, stype, key, _location, numel, view = pid
        else:
            if len(pid) != 5:
                raise CheckpointFormatError(f"{self._what}: malformed storage id {pid!r}")
            _, stype, key, _location, numel = pid
            view = None
        if not isinstance(stype, _StorageType):
            raise CheckpointFormatError(f"{self._what}: storage of unknown type {stype!r}")
        key = str(key)
        numel = _as_int(numel, "storage size")
        if numel < 0:
            raise CheckpointFormatError(f"{self._what}: negative storage size")
        st = self._storages.get(key)
        if st is None:
            st = self._storages[key] = _Storage(key, stype.dtype, numel)
        if view is None:
            return st
        view_key, offset, view_size = view
        v = self._views.get(str(view_key))
        if v is None:
            v = self._views[str(view_key)] = _StorageView(st, offset, view_size)
        return v


# ----------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """'torch-zip', 'torch-legacy' or 'safetensors'; CheckpointFormatError for anything else."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise FileNotFoundError(f"No such checkpoint file: {path}") from None
    if not head:
        raise CheckpointFormatError(f"{path}: empty file")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head.startswith(_LEGACY_PREFIX):
        return "torch-legacy"
    if _opens_as_safetensors(path):
        return "safetensors"
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise CheckpointFormatError(
            f"{path}: a tar archive (the torch<0.4 tar checkpoint format), which is not supported; "
            "re-save it with a recent torch (torch.save(state_dict, path)).")
    if head[:1] == b"\x80":
        raise CheckpointFormatError(
            f"{path}: a bare pickle, not a torch.save checkpoint (no zip container and no legacy torch "
            "magic number); plain pickles are not read. Save with torch.save or safetensors.")
    raise CheckpointFormatError(
        f"{path}: unknown checkpoint format (first bytes {head[:8]!r}); expected a torch.save file "
        "(zip or legacy) or a .safetensors file.")


def _finalize(obj, byteorder: str):
    """Replace every _LazyTensor by a numpy array and stand-ins by plain data."""
    if isinstance(obj, _LazyTensor):
        return obj.materialize(byteorder)
    if isinstance(obj, Mapping):
        return {k: _finalize(v, byteorder) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finalize(v, byteorder) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finalize(v, byteorder) for v in obj)
    if isinstance(obj, Namespace):
        return {k: _finalize(v, byteorder) for k, v in vars(obj).items()}
    if isinstance(obj, _DTypeBox):
        return obj.dtype
    if isinstance(obj, (_Storage, _StorageView, _StorageType, _TorchDType, _TypeMarker)):
        return repr(obj)
    return obj


def _load_zip(path: str) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointFormatError(f"{path}: truncated or corrupt zip checkpoint ({e})") from None
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            hint = (" It looks like a TorchScript archive (torch.jit.save); save model.state_dict() "
                    "with torch.save instead.") if any(n.endswith("/constants.pkl") for n in names) else ""
            raise CheckpointFormatError(f"{path}: zip file without <prefix>/data.pkl: not a torch.save "
                                        f"checkpoint.{hint}")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"{path}: unknown byteorder record {byteorder!r}")
        storages: dict[str, _Storage] = {}
        try:
            data = zf.read(pkls[0])
        except (zipfile.BadZipFile, OSError, EOFError, _zlib_error()) as e:
            raise CheckpointFormatError(f"{path}: truncated or corrupt zip checkpoint ({e})") from None
        obj = _unpickle(io.BytesIO(data), storages, legacy=False, what=path)
        for key, st in storages.items():
            name = f"{prefix}data/{key}"
            try:
                st.data = zf.read(name)
            except KeyError:
                raise CheckpointFormatError(f"{path}: storage record {name} missing (corrupt file)") from None
            except (zipfile.BadZipFile, OSError, EOFError, _zlib_error()) as e:
                raise CheckpointFormatError(f"{path}: truncated or corrupt storage {name} ({e})") from None
            if len(st.data) < st.nbytes:
                raise CheckpointFormatError(f"{path}: storage {name} has {len(st.data)} bytes, expected "
                                            f"{st.nbytes} (truncated or corrupt file)")
            st.data = memoryview(st.data)[: st.nbytes]
        return _finalize(obj, byteorder)


def _zlib_error():
    import zlib
    return zlib.error


def _unpickle(f, storages, legacy, what):
    try:
        return _RestrictedUnpickler(f, storages, legacy, what).load()
    except CheckpointFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointFormatError(f"{what}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        magic = _unpickle(f, None, True, path)
        if magic != _LEGACY_MAGIC:
            raise CheckpointFormatError(f"{path}: bad legacy magic number (corrupt file)")
        proto = _unpickle(f, None, True, path)
        if proto != _LEGACY_PROTOCOL:
            raise CheckpointFormatError(f"{path}: unsupported legacy protocol version {proto!r}")
        sys_info = _unpickle(f, None, True, path)
        if not isinstance(sys_info, dict):
            raise CheckpointFormatError(f"{path}: malformed legacy sys_info")
        byteorder = "little" if sys_info.get("little_endian", True) else "big"
        storages: dict[str, _Storage] = {}
        obj = _unpickle(f, storages, True, path)
        keys = _unpickle(f, None, True, path)
        if not isinstance(keys, list):
            raise CheckpointFormatError(f"{path}: malformed legacy storage key list")
        fmt = "<q" if byteorder == "little" else ">q"
        for key in keys:
            st = storages.get(str(key))
            if st is None:
                raise CheckpointFormatError(f"{path}: storage key {key!r} not referenced by the pickle")
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointFormatError(f"{path}: truncated file (storage {key} header missing)")
            (numel,) = struct.unpack(fmt, raw)
            if numel != st.numel:
                raise CheckpointFormatError(f"{path}: storage {key} holds {numel} elements, the pickle "
                                            f"says {st.numel} (corrupt file)")
            st.data = f.read(st.nbytes)
            if len(st.data) != st.nbytes:
                raise CheckpointFormatError(f"{path}: truncated file (storage {key}: {len(st.data)} of "
                                            f"{st.nbytes} bytes)")
        missing = [k for k, st in storages.items() if st.data is None]
        if missing:
            raise CheckpointFormatError(f"{path}: storages {missing[:5]} have no data (corrupt file)")
        return _finalize(obj, byteorder)


def _opens_as_safetensors(path: str) -> bool:
    """Whether the `safetensors` package reads the file's header; a damaged file named
    *.safetensors raises CheckpointFormatError."""
    try:
        with safetensors.safe_open(path, framework="numpy"):
            return True
    except safetensors.SafetensorError as err:
        if path.endswith(".safetensors"):
            raise CheckpointFormatError(f"{path}: truncated or corrupt safetensors file "
                                        f"({err})") from None
        return False


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, TypeError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: unreadable safetensors file ({err})") from None


def load_torch_object(path: str | os.PathLike) -> Any:
    """The object saved in ``path`` as plain data: dicts, lists, tuples, numbers, numpy arrays.

    Tensors become numpy arrays (C-contiguous copies; bfloat16/float8 use ``ml_dtypes``). Nothing
    from the file is executed: any pickled global outside a small allow-list raises
    :class:`UnsafePickleError`.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "torch-zip":
        return _load_zip(path)
    if fmt == "torch-legacy":
        return _load_legacy(path)
    return _load_safetensors(path)


# ----------------------------------------------------------------------------------------------
# state dicts
# ----------------------------------------------------------------------------------------------
_CONTAINER_KEYS = ("model_dict", "state_dict", "model_state_dict", "model", "network", "net")


def flatten_state_dict(obj: Any) -> dict[str, np.ndarray]:
    """The tensors of a loaded checkpoint, as one flat ``{dotted key: array}`` dict.

    Unwraps the usual containers: DomainBed's ``{'args', 'model_dict', ...}`` (``model_best.pkl``),
    ``{'state_dict': ...}``, ``{'model': ...}``; nested dicts are joined with '.'. Non-tensor
    values (hyper-parameters, results strings) are dropped.
    """
    if isinstance(obj, np.ndarray):
        raise CheckpointFormatError(f"the checkpoint holds a single tensor of shape {obj.shape}, "
                                    "not a state_dict")
    if isinstance(obj, Mapping):
        for key in _CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _has_arrays(inner):
                return flatten_state_dict(inner)
    flat: dict[str, np.ndarray] = {}

    def walk(o, prefix):
        if isinstance(o, np.ndarray):
            flat[prefix] = o
        elif isinstance(o, Mapping):
            for k, v in o.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))

    walk(obj, "")
    if not flat:
        top = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointFormatError(f"no tensors found in the checkpoint (top level: {top})")
    return flat


def _has_arrays(o) -> bool:
    if isinstance(o, np.ndarray):
        return True
    if isinstance(o, Mapping):
        return any(_has_arrays(v) for v in o.values())
    return False


_HEAD_NAMES = ("fc", "_fc", "classifier")


def _strip(d: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def canonicalize_state_dict(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename the keys of a flat state dict to one canonical layout.

    Backbone keys keep their torch names without wrapper prefixes (``conv1.weight``,
    ``layer1.0.bn1.running_mean``, ``_blocks.3._expand_conv.weight``); the classification head
    becomes ``classifier.weight`` / ``classifier.bias`` whatever it was called (torchvision ``fc``,
    efficientnet_pytorch ``_fc``, DomainBed ``classifier`` or Sequential index ``1``).

    Handles DomainBed's files (docs/protocol.md §2): ``model_best.pkl``'s model_dict (``featurizer.*`` and
    ``classifier.*`` are used, the ``network.0.*``/``network.1.*`` duplicates dropped),
    ``network_best.pkl`` (``0.network.*``, ``1.*``), ``featurizer_last.pkl`` (``network.*``), and a
    ``module.`` (DataParallel) prefix. ``num_batches_tracked`` and ``update_count`` are dropped.
    """
    sd = {k: v for k, v in flat.items()
          if k.rsplit(".", 1)[-1] != "num_batches_tracked" and k.rsplit(".", 1)[-1] != "update_count"}
    if sd and all(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    keys = list(sd)
    if any(k.startswith("featurizer.") for k in keys):
        feat, head = _strip(sd, "featurizer."), _strip(sd, "classifier.")
        rest = {k: v for k, v in sd.items() if not k.startswith(("featurizer.", "classifier.", "network."))}
        feat.update(rest)  # anything unexpected stays visible to the shape check
    elif keys and all(k.startswith(("network.0.", "network.1.")) for k in keys):
        feat, head = _strip(sd, "network.0."), _strip(sd, "network.1.")
    elif keys and all(k.startswith(("0.", "1.")) for k in keys):
        feat, head = _strip(sd, "0."), _strip(sd, "1.")
    else:
        feat, head = sd, {}
    if feat and all(k.startswith("network.") for k in feat):
        feat = _strip(feat, "network.")
    if not head:
        for name in _HEAD_NAMES:
            sub = _strip(feat, name + ".")
            if sub and set(sub) <= {"weight", "bias"}:
                head = sub
                feat = {k: v for k, v in feat.items() if not k.startswith(name + ".")}
                break
    out = dict(feat)
    out.update({f"classifier.{k}": v for k, v in head.items()})
    return out


def read_torch_file(path: str | os.PathLike, *, raw: bool = False) -> dict[str, np.ndarray]:
    """Read a torch/safetensors checkpoint into a flat ``{key: numpy array}`` state dict.

    No torch import and no code from the file is run (see :func:`load_torch_object`). By default
    the keys are canonicalized (:func:`canonicalize_state_dict`): wrapper prefixes stripped, the
    head named ``classifier.*``, ``num_batches_tracked``/``update_count`` dropped. ``raw=True``
    returns the flattened keys exactly as stored.
    """
    flat = flatten_state_dict(load_torch_object(path))
    return flat if raw else canonicalize_state_dict(flat)
