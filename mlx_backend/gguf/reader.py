"""Parse a GGUF file's header, metadata and tensor table; tensor data stays memory-mapped.

A GGUF file may come from anywhere, so the parser trusts nothing it declares:
every count, length and dimension goes through ``bounded`` (the one range
check for declared numbers, also used for metadata values by
``architecture``) and is checked against the bytes left in the file before
anything is allocated for it.  A file that fails any check raises
``GGUFImportError`` naming the file and the entry at fault.

``is_gguf`` is the one test for "is this a GGUF file" (the magic ``GGUF`` in
the first four bytes); the model loader uses it to tell GGUF files from model
folders.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

GGUF_MAGIC = b"GGUF"


class GGUFImportError(Exception):
    """A GGUF file cannot be imported; the message names the file and why."""


class Corrupt(Exception):
    """A declared value is invalid; turned into GGUFImportError with the file name."""


class _Truncated(Exception):
    """A declared size runs past the end of the file."""


def is_gguf(path) -> bool:
    """True when ``path`` is a regular file that starts with the GGUF magic.

    A file that exists but cannot be read raises OSError: it is not known to
    be something other than a GGUF.
    """
    return os.path.isfile(path) and _read_magic(path) == GGUF_MAGIC


def _read_magic(path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_NUMPY_TYPES = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}
_TYPE_STRING, _TYPE_ARRAY = 8, 9

# Limits for what a header may declare.  A hostile file must fail before we
# allocate for it, so every count is checked against these and against the
# bytes actually left in the file (each entry takes at least *_MIN_BYTES).
_MAX_TENSORS = 1 << 16           # big MoE GGUFs hold a few thousand
_MAX_KV = 1 << 16                # real files hold < 100 keys
_MAX_KEY_BYTES = 1 << 10
_MAX_NAME_BYTES = 1 << 10        # llama.cpp itself allows 63
_MAX_STRING_BYTES = 8 << 20      # chat templates are tens of KiB
_MAX_TOKEN_BYTES = 64 << 10      # one element of a string array (token, merge)
_MAX_OBJECTS = 1 << 22           # strings + nested lists in all metadata arrays
_MAX_ARRAY_DEPTH = 4
_MAX_DIMS = 4                    # GGML_MAX_DIMS
_MAX_DIM = 1 << 40
_MAX_ALIGNMENT = 1 << 20
_KV_MIN_BYTES = 8 + 4 + 1        # key length, value type, smallest value
_TENSOR_MIN_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_NESTED_MIN_BYTES = 4 + 8        # element type, count


def bounded(what: str, value, low: int, high: int) -> int:
    """The one range check for declared numbers: an integer in [low, high] or Corrupt.

    Integral floats pass (as ``int()`` let them before); bools, strings and
    arrays do not.
    """
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise Corrupt(f"{what} must be an integer, got {show(value)}")
    value = int(value)
    if value < low:
        raise Corrupt(f"{what} is {value}, must be at least {low}")
    if value > high:
        raise Corrupt(f"{what} is {value}, the limit is {high}")
    return value


def show(value) -> str:
    """A value for an error message, cut short: hostile values can be huge."""
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class TensorInfo:
    name: str
    shape: Tuple[int, ...]  # numpy order: rows first (GGUF dims reversed)
    ggml_type: int
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, math.prod(self.shape[:-1]))


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict
    tensors: Dict[str, TensorInfo]
    data: np.ndarray  # the whole file, memory-mapped uint8

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as (rows, row_bytes)."""
        flat = self.data[info.offset: info.offset + info.nbytes]
        return flat.reshape(-1, info.row_bytes)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Cursor:
    """Bounds-checked little-endian reader over the mapped file."""

    def __init__(self, buf: np.ndarray):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.objects_left = _MAX_OBJECTS

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(f"needs {n} bytes at offset {self.pos}, file has {self.size}")

    def count(self, what: str, count: int, min_bytes: int, cap: int) -> int:
        """A declared count must be under ``cap`` and fit in the rest of the file."""
        left = self.size - self.pos
        if count * min_bytes > left:
            raise _Truncated(
                f"{what} is {count}, but {count} entries of at least {min_bytes} bytes "
                f"cannot fit in the {left} bytes left in the file"
            )
        return bounded(what, count, 0, cap)

    def objects(self, what: str, count: int, min_bytes: int) -> int:
        """Strings and nested lists cost ~50 bytes of memory each: budget them."""
        count = self.count(what, count, min_bytes, self.objects_left)
        self.objects_left -= count
        return count

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self._need(n)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        if fmt == "<f":  # shortest float32 repr: 1e-05, not 9.999999747378752e-06
            value = float(str(np.float32(value)))
        return value

    def string(self, cap: int = _MAX_STRING_BYTES) -> str:
        n = self.scalar("<Q")
        if n > cap or self.pos + n > self.size:
            raise _string_error(n, self.pos, self.size, cap)
        raw = self.buf[self.pos: self.pos + n].tobytes()
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def _strings(self, count: int) -> List[str]:
        """Vocabularies hold ~100k strings: keep this loop tight."""
        view = memoryview(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        pos, size, out = self.pos, self.size, []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                raise _Truncated(f"string length at offset {pos} past end of file ({size})")
            (n,) = unpack(view, pos)
            pos += 8
            if n > _MAX_TOKEN_BYTES or pos + n > size:
                raise _string_error(n, pos, size, _MAX_TOKEN_BYTES, f"element {i}: ")
            append(str(view[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def array(self, depth: int = 0):
        elem_type = self.scalar("<I")
        count = self.scalar("<Q")
        if elem_type == _TYPE_STRING:
            # every string has at least its length field
            return self._strings(self.objects("string array length", count, 8))
        if elem_type == _TYPE_ARRAY:
            if depth + 1 >= _MAX_ARRAY_DEPTH:
                raise Corrupt(f"arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            count = self.objects("nested array length", count, _NESTED_MIN_BYTES)
            return [self.array(depth + 1) for _ in range(count)]
        dtype = _NUMPY_TYPES.get(elem_type)
        if dtype is None:
            raise Corrupt(f"unknown metadata value type {elem_type}")
        itemsize = np.dtype(dtype).itemsize
        count = self.count("array length", count, itemsize, self.size)
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += itemsize * count
        return values

    def value(self, value_type: int):
        if value_type == _TYPE_STRING:
            return self.string()
        if value_type == _TYPE_ARRAY:
            return self.array()
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise Corrupt(f"unknown metadata value type {value_type}")
        return self.scalar(fmt)


def _string_error(n: int, pos: int, size: int, cap: int, where: str = "") -> Exception:
    """Why a declared string length is refused: over the cap, or past the end."""
    if n > cap:
        return Corrupt(f"{where}string of {n} bytes exceeds the limit of {cap} bytes")
    return _Truncated(f"{where}string of {n} bytes at offset {pos} past end of file ({size})")


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF file's header; raise GGUFImportError if it is not a usable GGUF."""
    path = Path(path)
    _check_magic(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as err:
        raise GGUFImportError(f"{path}: cannot map file: {err}") from err
    try:
        return _parse(path, data)
    except _Truncated as err:
        raise GGUFImportError(f"{path}: truncated or corrupt GGUF file ({err})") from None
    except Corrupt as err:
        raise GGUFImportError(f"{path}: corrupt GGUF file ({err})") from None
    except (ValueError, OverflowError, struct.error, MemoryError, RecursionError) as err:
        # every check above should come first; this keeps any miss a clean failure
        raise GGUFImportError(f"{path}: corrupt GGUF file ({type(err).__name__}: {err})") from None


def _check_magic(path: Path) -> None:
    """Like ``is_gguf``, but the error says why: missing, unreadable or wrong magic."""
    try:
        magic = _read_magic(path)
    except FileNotFoundError:
        raise GGUFImportError(f"{path}: file not found") from None
    except OSError as err:
        raise GGUFImportError(f"{path}: cannot read file: {err}") from err
    if magic != GGUF_MAGIC:
        raise GGUFImportError(
            f"{path}: not a GGUF file (wrong magic {magic!r}, expected {GGUF_MAGIC!r})"
        )


def _parse(path: Path, data: np.ndarray) -> GGUFFile:
    """Header, metadata and tensor table; errors say which entry they were in."""
    cur = _Cursor(data)
    cur.pos = 4
    where = "header"
    try:
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise Corrupt(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = cur.scalar("<Q")
        n_kv = cur.scalar("<Q")
        n_tensors = cur.count("tensor count", n_tensors, _TENSOR_MIN_BYTES, _MAX_TENSORS)
        n_kv = cur.count("metadata key count", n_kv, _KV_MIN_BYTES, _MAX_KV)
        metadata = {}
        for i in range(n_kv):
            where = f"metadata entry #{i}"
            key = cur.string(_MAX_KEY_BYTES)
            where = f"metadata key {show(key)}"
            if key in metadata:
                raise Corrupt("duplicate key")
            metadata[key] = cur.value(cur.scalar("<I"))
        where = "metadata"
        alignment = _alignment(metadata)
        infos = []
        for i in range(n_tensors):
            where = f"tensor #{i}"
            name = cur.string(_MAX_NAME_BYTES)
            where = f"tensor {show(name)}"
            infos.append((name, *_read_tensor_info(cur)))
        where = "tensor data"
        data_start = -(-cur.pos // alignment) * alignment
        tensors = {}
        for name, shape, ggml_type, rel_offset in infos:
            where = f"tensor {show(name)}"
            if name in tensors:
                raise Corrupt("duplicate tensor name")
            if rel_offset % alignment:
                raise Corrupt(f"offset {rel_offset} is not a multiple of alignment {alignment}")
            tensors[name] = _tensor_info(name, shape, ggml_type, data_start + rel_offset, cur.size)
        where = "tensor data"
        _check_overlaps(tensors)
    except (_Truncated, Corrupt) as err:
        raise type(err)(f"{where}: {err}") from None
    return GGUFFile(path, version, metadata, tensors, data)


def _alignment(metadata: dict) -> int:
    """``general.alignment``: a power of two (32 when absent), as llama.cpp requires."""
    value = metadata.get("general.alignment", 32)
    alignment = bounded("general.alignment", value, 1, _MAX_ALIGNMENT)
    if alignment & (alignment - 1):
        raise Corrupt(f"general.alignment {alignment} is not a power of two")
    return alignment


def _read_tensor_info(cur: _Cursor):
    """(shape, type, offset) after the name; dims are checked before they are used."""
    n_dims = bounded("number of dimensions", cur.scalar("<I"), 1, _MAX_DIMS)
    dims = [bounded(f"dimension {d}", cur.scalar("<Q"), 1, _MAX_DIM) for d in range(n_dims)]
    ggml_type = cur.scalar("<I")
    offset = cur.scalar("<Q")
    return tuple(reversed(dims)), ggml_type, offset


def _tensor_info(name: str, shape, ggml_type: int, offset: int, file_size: int) -> TensorInfo:
    """Size the tensor and check it lies inside the file.

    A type this gguf package does not know is reported later (by name); its
    size is unknown, but no type packs more than 8 elements per byte.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    elements = math.prod(shape)
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        if offset + elements // 8 > file_size:
            raise _Truncated(
                f"{elements} elements at byte {offset} cannot fit in the file ({file_size} bytes)"
            ) from None
        return TensorInfo(name, shape, ggml_type, offset, 0)
    ne0 = shape[-1]
    if ne0 % block:
        raise Corrupt(f"row of {ne0} is not a multiple of block size {block}")
    nbytes = elements // block * type_size
    if offset + nbytes > file_size:
        raise _Truncated(f"ends at byte {offset + nbytes}, past the end of the file ({file_size})")
    return TensorInfo(name, shape, ggml_type, offset, nbytes)


def _check_overlaps(tensors: Dict[str, TensorInfo]) -> None:
    """Two tensors sharing bytes means a forged table (cheap: one sort)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise Corrupt(f"tensors {first!r} and {second!r} overlap")
