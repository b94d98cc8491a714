"""Import a GGUF file into an MLX model folder that ``mlx_lm.load`` can open.

GGUF is what most local-LLM users hold; mlx-lm wants a Hugging Face style
folder (config.json, safetensors, tokenizer.json).  ``import_gguf`` converts
once and keeps the result in a cache folder keyed by the file's identity, so
later loads only stat the file.

Tensor handling:
- F32 / F16 / BF16 are copied as they are.
- Q4_0, Q4_1 and Q8_0 are repacked bit-exactly into MLX affine quantized
  triples (weight, scales, biases) with group size 32.
- Every other type the ``gguf`` package can dequantize (K-quants, Q5_x,
  IQ-quants, ...) is dequantized to float16, or re-quantized with
  ``mx.quantize`` when ``requant_bits`` is given.
- llama GGUFs store Q/K rows in llama.cpp's interleaved rotary order; those
  rows are put back in Hugging Face order, so mlx-lm's default rope applies.

Layout of the cache: ``<cache_root>/<name>-<hash>/`` written through a temp
folder beside it and renamed into place; a marker file is written last.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

IMPORTER_VERSION = "1"
MARKER_NAME = ".gguf-import-complete.json"
CACHE_ENV = "MLX_BACKEND_GGUF_CACHE"
SHARD_BYTES = 2 << 30
_GGUF_MAGIC = b"GGUF"

ProgressFn = Callable[[int, int], None]


class GGUFImportError(Exception):
    """A GGUF file cannot be imported; the message names the file and why."""


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``$MLX_BACKEND_GGUF_CACHE`` or ``~/.cache/mlx-backend/gguf``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mlx-backend" / "gguf"


def import_gguf(
    gguf_path,
    cache_root=None,
    *,
    progress: Optional[ProgressFn] = None,
    requant_bits: Optional[int] = None,
    requant_group_size: int = 64,
) -> Path:
    """Return an MLX model folder for ``gguf_path``, importing it on first use.

    ``progress(done, total)`` is called as tensors are converted.
    ``requant_bits`` (e.g. 4 or 8) re-quantizes tensors whose GGUF type MLX
    cannot hold natively (K-quants and others) instead of keeping float16.
    """
    path = Path(gguf_path).expanduser()
    _check_requant(path, requant_bits, requant_group_size)
    stat = _stat_source(path)
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    key = _cache_key(path, stat, requant_bits, requant_group_size)
    target = root / f"{_safe_stem(path)}-{key[:20]}"
    if _is_complete(target):
        return target
    gguf = read_gguf(path)
    plan = _plan_import(gguf)
    tmp = _make_temp_dir(path, root, target)
    try:
        _write_folder(gguf, plan, tmp, requant_bits, requant_group_size, progress)
        _write_marker(tmp, path, stat, key)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared
        return _publish(tmp, target)
    except GGUFImportError:
        raise
    except (OSError, ValueError, RuntimeError, MemoryError) as err:
        raise GGUFImportError(f"{path}: import failed: {err}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_temp_dir(path: Path, root: Path, target: Path) -> Path:
    """The import is written here, beside its final place, then renamed."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
    except OSError as err:
        raise GGUFImportError(f"{path}: cannot create cache folder in {root}: {err}") from err


def _check_requant(path: Path, bits, group_size) -> None:
    if bits is None:
        return
    if bits not in (2, 3, 4, 5, 6, 8) or group_size not in (32, 64, 128):
        raise GGUFImportError(
            f"{path}: unsupported re-quantization bits={bits} group_size={group_size} "
            "(bits 2,3,4,5,6,8; group size 32, 64, 128)"
        )


def _stat_source(path: Path) -> os.stat_result:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise GGUFImportError(f"{path}: file not found") from None
    except OSError as err:
        raise GGUFImportError(f"{path}: cannot read file: {err}") from err
    if not path.is_file():
        raise GGUFImportError(f"{path}: not a regular file")
    return stat


def _cache_key(path: Path, stat: os.stat_result, bits, group_size) -> str:
    """Identity of the source file plus everything that changes the output."""
    ident = {
        "path": os.path.realpath(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "importer": IMPORTER_VERSION,
        "requant_bits": bits,
        "requant_group_size": group_size if bits is not None else None,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _safe_stem(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]
    return stem.lstrip(".") or "model"


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER_NAME).is_file()


def _write_marker(folder: Path, path: Path, stat: os.stat_result, key: str) -> None:
    marker = {
        "source": os.path.realpath(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "importer_version": IMPORTER_VERSION,
        "key": key,
    }
    _write_json(folder / MARKER_NAME, marker)


def _publish(tmp: Path, target: Path) -> Path:
    """Rename the finished temp folder into place; another importer may have won."""
    if target.exists() and not _is_complete(target):
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except OSError:
        if _is_complete(target):
            return target
        raise
    return target


# ----------------------------------------------------------------------------
# GGUF parsing (header, metadata, tensor table); tensor data stays memory-mapped
# ----------------------------------------------------------------------------

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


def _bounded(what: str, value, low: int, high: int) -> int:
    """The one range check for declared numbers: an integer in [low, high] or _Corrupt.

    Integral floats pass (as ``int()`` let them before); bools, strings and
    arrays do not.
    """
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _Corrupt(f"{what} must be an integer, got {_show(value)}")
    value = int(value)
    if value < low:
        raise _Corrupt(f"{what} is {value}, must be at least {low}")
    if value > high:
        raise _Corrupt(f"{what} is {value}, the limit is {high}")
    return value


def _show(value) -> str:
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
        return _bounded(what, count, 0, cap)

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
                raise _Corrupt(f"arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            count = self.objects("nested array length", count, _NESTED_MIN_BYTES)
            return [self.array(depth + 1) for _ in range(count)]
        dtype = _NUMPY_TYPES.get(elem_type)
        if dtype is None:
            raise _Corrupt(f"unknown metadata value type {elem_type}")
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
            raise _Corrupt(f"unknown metadata value type {value_type}")
        return self.scalar(fmt)


def _string_error(n: int, pos: int, size: int, cap: int, where: str = "") -> Exception:
    """Why a declared string length is refused: over the cap, or past the end."""
    if n > cap:
        return _Corrupt(f"{where}string of {n} bytes exceeds the limit of {cap} bytes")
    return _Truncated(f"{where}string of {n} bytes at offset {pos} past end of file ({size})")


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


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
    except _Corrupt as err:
        raise GGUFImportError(f"{path}: corrupt GGUF file ({err})") from None
    except (ValueError, OverflowError, struct.error, MemoryError, RecursionError) as err:
        # every check above should come first; this keeps any miss a clean failure
        raise GGUFImportError(f"{path}: corrupt GGUF file ({type(err).__name__}: {err})") from None


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise GGUFImportError(f"{path}: file not found") from None
    except OSError as err:
        raise GGUFImportError(f"{path}: cannot read file: {err}") from err
    if magic != _GGUF_MAGIC:
        raise GGUFImportError(
            f"{path}: not a GGUF file (wrong magic {magic!r}, expected {_GGUF_MAGIC!r})"
        )


def _parse(path: Path, data: np.ndarray) -> GGUFFile:
    """Header, metadata and tensor table; errors say which entry they were in."""
    cur = _Cursor(data)
    cur.pos = 4
    where = "header"
    try:
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise _Corrupt(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = cur.scalar("<Q")
        n_kv = cur.scalar("<Q")
        n_tensors = cur.count("tensor count", n_tensors, _TENSOR_MIN_BYTES, _MAX_TENSORS)
        n_kv = cur.count("metadata key count", n_kv, _KV_MIN_BYTES, _MAX_KV)
        metadata = {}
        for i in range(n_kv):
            where = f"metadata entry #{i}"
            key = cur.string(_MAX_KEY_BYTES)
            where = f"metadata key {_show(key)}"
            if key in metadata:
                raise _Corrupt("duplicate key")
            metadata[key] = cur.value(cur.scalar("<I"))
        where = "metadata"
        alignment = _alignment(metadata)
        infos = []
        for i in range(n_tensors):
            where = f"tensor #{i}"
            name = cur.string(_MAX_NAME_BYTES)
            where = f"tensor {_show(name)}"
            infos.append((name, *_read_tensor_info(cur)))
        where = "tensor data"
        data_start = -(-cur.pos // alignment) * alignment
        tensors = {}
        for name, shape, ggml_type, rel_offset in infos:
            where = f"tensor {_show(name)}"
            if name in tensors:
                raise _Corrupt("duplicate tensor name")
            if rel_offset % alignment:
                raise _Corrupt(f"offset {rel_offset} is not a multiple of alignment {alignment}")
            tensors[name] = _tensor_info(name, shape, ggml_type, data_start + rel_offset, cur.size)
        where = "tensor data"
        _check_overlaps(tensors)
    except (_Truncated, _Corrupt) as err:
        raise type(err)(f"{where}: {err}") from None
    return GGUFFile(path, version, metadata, tensors, data)


def _alignment(metadata: dict) -> int:
    """``general.alignment``: a power of two (32 when absent), as llama.cpp requires."""
    value = metadata.get("general.alignment", 32)
    alignment = _bounded("general.alignment", value, 1, _MAX_ALIGNMENT)
    if alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment {alignment} is not a power of two")
    return alignment


def _read_tensor_info(cur: _Cursor):
    """(shape, type, offset) after the name; dims are checked before they are used."""
    n_dims = _bounded("number of dimensions", cur.scalar("<I"), 1, _MAX_DIMS)
    dims = [_bounded(f"dimension {d}", cur.scalar("<Q"), 1, _MAX_DIM) for d in range(n_dims)]
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
        raise _Corrupt(f"row of {ne0} is not a multiple of block size {block}")
    nbytes = elements // block * type_size
    if offset + nbytes > file_size:
        raise _Truncated(f"ends at byte {offset + nbytes}, past the end of the file ({file_size})")
    return TensorInfo(name, shape, ggml_type, offset, nbytes)


def _check_overlaps(tensors: Dict[str, TensorInfo]) -> None:
    """Two tensors sharing bytes means a forged table (cheap: one sort)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise _Corrupt(f"tensors {first!r} and {second!r} overlap")


# ----------------------------------------------------------------------------
# Architecture: metadata -> config.json, GGUF tensor names -> mlx-lm names
# ----------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF tensors that carry no weights mlx-lm needs (handled through config).
_IGNORED_TENSORS = {"rope_freqs.weight"}
_IGNORED_BLOCK_TENSORS = {"attn_rot_embd"}

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


# Sane bounds for architecture values; the tensors must also agree with them.
_MAX_LAYERS = 1024
_MAX_HEADS = 4096
_MAX_HEAD_DIM = 4096
_MAX_WIDTH = 1 << 20  # embedding_length, feed_forward_length
_MAX_VOCAB = 1 << 22
_MAX_CONTEXT = 1 << 31


@dataclass
class ImportPlan:
    config: dict
    names: Dict[str, str]  # GGUF tensor name -> mlx-lm parameter name
    permute_heads: Dict[str, int]  # GGUF tensor name -> heads to un-interleave
    tokenizer: object  # gguf_tokenizer.TokenizerFiles


def _plan_import(gguf: GGUFFile) -> ImportPlan:
    """Validate everything that can be checked before writing any file.

    Metadata values of the wrong type or range surface here as GGUFImportError
    too: nothing a file declares may escape as another exception.
    """
    try:
        return _plan(gguf)
    except _Corrupt as err:
        raise GGUFImportError(f"{gguf.path}: invalid metadata: {err}") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as err:
        raise GGUFImportError(
            f"{gguf.path}: invalid metadata ({type(err).__name__}: {err})"
        ) from None


def _plan(gguf: GGUFFile) -> ImportPlan:
    from .gguf_tokenizer import TokenizerBuildError, build_tokenizer_files

    path = gguf.path
    raw_arch = gguf.metadata.get("general.architecture")
    if raw_arch is None or (isinstance(raw_arch, str) and not raw_arch):
        raise GGUFImportError(f"{path}: missing required metadata key 'general.architecture'")
    arch = raw_arch if isinstance(raw_arch, str) else _show(raw_arch)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{path}: unsupported architecture '{arch}' "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    splits = _meta_int(gguf, "split.count", 0, 1 << 16, default=1)
    if splits > 1:
        raise GGUFImportError(
            f"{path}: split GGUF ({splits} parts) is not supported; merge it with "
            "llama-gguf-split --merge first"
        )
    _check_tensor_types(gguf)
    names = _map_tensor_names(gguf)
    config = _build_config(gguf, names)
    _check_vocab(gguf, config)  # before the tokenizer: that is the costly part
    try:
        tokenizer = build_tokenizer_files(gguf.metadata)
    except TokenizerBuildError as err:
        raise GGUFImportError(f"{path}: {err}") from None
    _check_against_model(gguf, config, names)
    config["bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.eos_token_ids:
        config["eos_token_id"] = tokenizer.eos_token_ids
    permute = {}
    if arch == "llama":
        for layer in range(config["num_hidden_layers"]):
            for kind, heads in (("q", config["num_attention_heads"]),
                                ("k", config["num_key_value_heads"])):
                for suffix in ("weight", "bias"):
                    permute[f"blk.{layer}.attn_{kind}.{suffix}"] = heads
    return ImportPlan(config, names, permute, tokenizer)


def _meta(gguf: GGUFFile, key: str, default=None, required=False):
    value = gguf.metadata.get(key)
    if value is None:
        if required:
            raise GGUFImportError(f"{gguf.path}: missing required metadata key '{key}'")
        return default
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise GGUFImportError(
                f"{gguf.path}: metadata key '{key}' holds per-layer values, which are not supported"
            )
        value = value.reshape(()).item()
    return value


def _meta_int(gguf: GGUFFile, key: str, low: int, high: int, default=None, required=False):
    """An integer metadata value, range-checked by ``_bounded``."""
    value = _meta(gguf, key, default, required)
    return None if value is None else _bounded(key, value, low, high)


def _meta_float(gguf: GGUFFile, key: str, default=None, required=False):
    """A positive finite float (epsilons, rope bases and factors)."""
    value = _meta(gguf, key, default, required)
    if value is None:
        return None
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number))
            or not math.isfinite(value) or value <= 0):
        raise _Corrupt(f"{key} must be a positive number, got {_show(value)}")
    return float(value)


def _check_tensor_types(gguf: GGUFFile) -> None:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import _type_traits

    for info in gguf.tensors.values():
        try:
            qtype = GGMLQuantizationType(info.ggml_type)
        except ValueError:
            raise GGUFImportError(
                f"{gguf.path}: tensor '{info.name}' has unknown tensor type {info.ggml_type}"
            ) from None
        if qtype.name not in ("F32", "F16", "BF16", "F64") and qtype not in _type_traits:
            raise GGUFImportError(
                f"{gguf.path}: tensor '{info.name}' has unsupported tensor type {qtype.name}"
            )


def _map_tensor_names(gguf: GGUFFile) -> Dict[str, str]:
    names = {}
    for name in gguf.tensors:
        if name in _IGNORED_TENSORS:
            continue
        if name in _GLOBAL_NAMES:
            names[name] = _GLOBAL_NAMES[name]
            continue
        m = re.fullmatch(r"blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)", name)
        if m and m.group(2) in _IGNORED_BLOCK_TENSORS:
            continue
        if not m or m.group(2) not in _BLOCK_NAMES:
            raise GGUFImportError(
                f"{gguf.path}: unexpected tensor '{name}' for architecture '{gguf.architecture}'"
            )
        layer, kind, suffix = m.groups()
        names[name] = f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.{suffix}"
    if "token_embd.weight" not in names:
        raise GGUFImportError(f"{gguf.path}: missing tensor 'token_embd.weight'")
    return names


def _build_config(gguf: GGUFFile, names: Dict[str, str]) -> dict:
    """config.json values, each range-checked and then checked against the tensors."""
    arch = gguf.architecture
    path = gguf.path

    def key(name):
        return f"{arch}.{name}"

    layers = _check_layer_count(gguf, names)
    hidden = _meta_int(gguf, key("embedding_length"), 1, _MAX_WIDTH, required=True)
    heads = _meta_int(gguf, key("attention.head_count"), 1, _MAX_HEADS, required=True)
    kv_heads = _meta_int(gguf, key("attention.head_count_kv"), 1, _MAX_HEADS, default=heads)
    if heads % kv_heads:
        raise GGUFImportError(
            f"{path}: {key('attention.head_count')} {heads} is not divisible by "
            f"{key('attention.head_count_kv')} {kv_heads}"
        )
    head_dim = _meta_int(gguf, key("attention.key_length"), 1, _MAX_HEAD_DIM)
    if head_dim is None:
        if hidden % heads:
            raise GGUFImportError(
                f"{path}: {key('embedding_length')} {hidden} is not divisible by "
                f"{key('attention.head_count')} {heads}"
            )
        head_dim = hidden // heads
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": _meta_int(gguf, key("feed_forward_length"), 1, _MAX_WIDTH,
                                       required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _meta_float(gguf, key("attention.layer_norm_rms_epsilon"),
                                    required=True),
        "max_position_embeddings": _meta_int(gguf, key("context_length"), 1, _MAX_CONTEXT,
                                             required=True),
        "vocab_size": _bounded("token_embd.weight rows (vocabulary size)",
                               gguf.tensors["token_embd.weight"].shape[0], 1, _MAX_VOCAB),
        "rope_theta": _meta_float(gguf, key("rope.freq_base"), 10000.0),
        "rope_traditional": False,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    _check_shapes(gguf, config)
    _check_rope_dims(gguf, config)
    scaling = _rope_scaling(gguf, config)
    if scaling is not None:
        config["rope_scaling"] = scaling
    if arch == "llama":
        config["attention_bias"] = _llama_attention_bias(gguf, names)
        config["mlp_bias"] = False
    return config


def _check_layer_count(gguf: GGUFFile, names: Dict[str, str]) -> int:
    """block_count sizes loops and the model: it must be the blk.N layers present."""
    key = f"{gguf.architecture}.block_count"
    declared = _meta_int(gguf, key, 0, 1 << 64, required=True)
    present = sorted({int(n.split(".")[2]) for n in names.values()
                      if n.startswith("model.layers.")})
    if declared != len(present):
        raise GGUFImportError(
            f"{gguf.path}: {key} {declared} declared but {len(present)} layers present "
            "(blk.N tensors)"
        )
    if present != list(range(len(present))):
        raise GGUFImportError(
            f"{gguf.path}: blk.N layers are not numbered 0..{len(present) - 1} "
            f"(found {_show(present)})"
        )
    return _bounded(key, declared, 1, _MAX_LAYERS)


def _check_shapes(gguf: GGUFFile, config: dict) -> None:
    """Declared sizes must match the tensors before mlx-lm builds a model from them."""
    arch = gguf.architecture
    h, hd, f = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    q, kv = heads * hd, kv_heads * hd
    emb = f"{arch}.embedding_length={h}"
    q_why = f"{arch}.attention.head_count={heads} x head dim {hd}, {emb}"
    kv_why = f"{arch}.attention.head_count_kv={kv_heads} x head dim {hd}, {emb}"
    ffn_why = f"{arch}.feed_forward_length={f}, {emb}"
    per_layer = {
        "attn_q.weight": ((q, h), q_why), "attn_k.weight": ((kv, h), kv_why),
        "attn_v.weight": ((kv, h), kv_why), "attn_output.weight": ((h, q), q_why),
        "ffn_gate.weight": ((f, h), ffn_why), "ffn_up.weight": ((f, h), ffn_why),
        "ffn_down.weight": ((h, f), ffn_why),
    }
    expected = {"token_embd.weight": ((config["vocab_size"], h), emb)}
    for layer in range(config["num_hidden_layers"]):
        for suffix, want in per_layer.items():
            expected[f"blk.{layer}.{suffix}"] = want
    for name, (shape, why) in expected.items():
        info = gguf.tensors.get(name)
        if info is not None and tuple(info.shape) != shape:
            raise GGUFImportError(
                f"{gguf.path}: tensor '{name}' has shape {list(info.shape)}, "
                f"but the metadata ({why}) implies {list(shape)}"
            )


def _check_rope_dims(gguf: GGUFFile, config: dict) -> None:
    """mlx-lm rotates the whole head; partial rotary GGUFs would be silently wrong."""
    arch = gguf.architecture
    n_rot = _meta_int(gguf, f"{arch}.rope.dimension_count", 0, _MAX_HEAD_DIM)
    if n_rot is not None and n_rot != config["head_dim"]:
        raise GGUFImportError(
            f"{gguf.path}: unsupported partial rotary embedding "
            f"({arch}.rope.dimension_count={n_rot}, head dim {config['head_dim']})"
        )
    if arch == "qwen2" and config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]:
        raise GGUFImportError(
            f"{gguf.path}: unsupported qwen2 head size {config['head_dim']} "
            "(mlx-lm's qwen2 needs hidden_size / head_count)"
        )


def _rope_scaling(gguf: GGUFFile, config: dict) -> Optional[dict]:
    arch = gguf.architecture
    kind = _meta(gguf, f"{arch}.rope.scaling.type")
    factor = _meta_float(gguf, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return _llama3_rope_scaling(gguf, config)
    if kind in ("linear", "yarn") and factor is None:
        raise GGUFImportError(
            f"{gguf.path}: missing required metadata key '{arch}.rope.scaling.factor'"
        )
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        original = _meta_int(gguf, f"{arch}.rope.scaling.original_context_length", 1,
                             _MAX_CONTEXT, config["max_position_embeddings"])
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise GGUFImportError(f"{gguf.path}: unsupported rope scaling type {_show(kind)}")


def _llama3_rope_scaling(gguf: GGUFFile, config: dict) -> Optional[dict]:
    """Llama 3.x GGUFs carry rope scaling as a rope_freqs tensor of per-pair factors.

    llama.cpp's converter computes them from the Llama 3 formula; we recover its
    parameters (Meta's published low/high frequency factors and original context)
    and check that they reproduce the tensor exactly.
    """
    info = gguf.tensors.get("rope_freqs.weight")
    if info is None:
        return None
    if tuple(info.shape) != (config["head_dim"] // 2,):
        raise GGUFImportError(
            f"{gguf.path}: tensor 'rope_freqs.weight' has shape {list(info.shape)}, "
            f"but head dim {config['head_dim']} implies [{config['head_dim'] // 2}]"
        )
    factors = _to_float32(gguf, info).reshape(-1)
    if np.allclose(factors, 1.0):
        return None
    dims, base = config["head_dim"], config["rope_theta"]
    for original in (8192, 4096, 2048, 16384, 32768):
        candidate = {"rope_type": "llama3", "factor": float(factors.max()),
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": original}
        if np.allclose(_llama3_factors(candidate, dims, base), factors, rtol=1e-4):
            return candidate
    raise GGUFImportError(
        f"{gguf.path}: unsupported rope_freqs tensor (not llama3 rope scaling with known parameters)"
    )


def _llama3_factors(scaling: dict, dims: int, base: float) -> np.ndarray:
    """The per-pair frequency divisors llama.cpp's converter writes for llama3 rope."""
    freqs = 1.0 / (base ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _llama_attention_bias(gguf: GGUFFile, names: Dict[str, str]) -> bool:
    present = {k for k in ("q", "k", "v", "output") if f"blk.0.attn_{k}.bias" in gguf.tensors}
    if present and present != {"q", "k", "v", "output"}:
        raise GGUFImportError(
            f"{gguf.path}: unsupported llama attention biases on {sorted(present)} only "
            "(mlx-lm's llama needs all of q, k, v, output or none)"
        )
    return bool(present)


def _check_vocab(gguf: GGUFFile, config: dict) -> None:
    """The token list must match the embedding rows (and so is bounded by them)."""
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFImportError(
            f"{gguf.path}: missing required metadata key 'tokenizer.ggml.tokens'"
        )
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise GGUFImportError(f"{gguf.path}: tokenizer.ggml.tokens is not an array of strings")
    rows = config["vocab_size"]
    if len(tokens) != rows:
        raise GGUFImportError(
            f"{gguf.path}: vocabulary size mismatch: {len(tokens)} tokens in "
            f"tokenizer.ggml.tokens but token_embd.weight has {rows} rows"
        )
    out = gguf.tensors.get("output.weight")
    if out is not None and out.shape[0] != rows:
        raise GGUFImportError(
            f"{gguf.path}: vocabulary size mismatch: output.weight has {out.shape[0]} rows, "
            f"token_embd.weight has {rows}"
        )


def _check_against_model(gguf: GGUFFile, config: dict, names: Dict[str, str]) -> None:
    """Build the (lazy, unevaluated) mlx-lm model and compare names and shapes."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
    except (ValueError, TypeError, KeyError, AssertionError) as err:
        raise GGUFImportError(f"{gguf.path}: metadata gives an invalid model config: {err}") from err
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    if config["tie_word_embeddings"]:
        expected.pop("lm_head.weight", None)
    by_mlx = {v: k for k, v in names.items()}
    missing = sorted(set(expected) - set(by_mlx))
    if missing:
        raise GGUFImportError(
            f"{gguf.path}: missing tensor(s) for '{gguf.architecture}': "
            + ", ".join(_gguf_name(m) for m in missing[:8])
        )
    extra = sorted(set(by_mlx) - set(expected))
    if extra:
        raise GGUFImportError(
            f"{gguf.path}: unexpected tensor(s) for '{gguf.architecture}': "
            + ", ".join(by_mlx[e] for e in extra[:8])
        )
    for mlx_name, shape in expected.items():
        got = gguf.tensors[by_mlx[mlx_name]].shape
        if tuple(got) != shape:
            raise GGUFImportError(
                f"{gguf.path}: tensor '{by_mlx[mlx_name]}' has shape {list(got)}, "
                f"metadata implies {list(shape)}"
            )


def _gguf_name(mlx_name: str) -> str:
    """Best-effort GGUF name for an mlx-lm parameter, for error messages."""
    for g, m in _GLOBAL_NAMES.items():
        if m == mlx_name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", mlx_name)
    if m:
        for g, mm in _BLOCK_NAMES.items():
            if mm == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    return mlx_name


# ----------------------------------------------------------------------------
# Tensor conversion
# ----------------------------------------------------------------------------

_NATIVE_QUANTS = ("Q4_0", "Q4_1", "Q8_0")


@dataclass
class Converted:
    """numpy arrays for one parameter: {'weight': ...} or a quantized triple."""

    arrays: Dict[str, np.ndarray]
    bits: Optional[int] = None
    group_size: Optional[int] = None
    bf16: bool = False  # 'weight' holds bfloat16 bits as uint16
    dequantized: bool = False


def convert_tensor(gguf: GGUFFile, info: TensorInfo) -> Converted:
    """Decode one GGUF tensor to numpy: native float, MLX triple, or float16."""
    from gguf.constants import GGMLQuantizationType

    qtype = GGMLQuantizationType(info.ggml_type)
    raw = gguf.raw(info)
    if qtype.name == "F32":
        return Converted({"weight": raw.view(np.float32).reshape(info.shape)})
    if qtype.name == "F16":
        return Converted({"weight": raw.view(np.float16).reshape(info.shape)})
    if qtype.name == "BF16":
        return Converted({"weight": raw.view(np.uint16).reshape(info.shape)}, bf16=True)
    if qtype.name == "F64":
        return Converted({"weight": raw.view(np.float64).astype(np.float32).reshape(info.shape)})
    if qtype.name in _NATIVE_QUANTS and len(info.shape) == 2:
        triple = _repack_native(qtype.name, raw, info.shape)
        if triple is not None:
            return triple
    return Converted({"weight": _dequantize(raw, qtype, info.shape)}, dequantized=True)


def _to_float32(gguf: GGUFFile, info: TensorInfo) -> np.ndarray:
    from gguf.constants import GGMLQuantizationType

    conv = convert_tensor(gguf, info)
    if conv.bf16:
        return (conv.arrays["weight"].astype(np.uint32) << 16).view(np.float32)
    if "scales" in conv.arrays:
        return _dequantize(gguf.raw(info), GGMLQuantizationType(info.ggml_type), info.shape)
    return conv.arrays["weight"].astype(np.float32)


def _dequantize(raw: np.ndarray, qtype, shape) -> np.ndarray:
    from gguf.quants import dequantize

    values = dequantize(np.ascontiguousarray(raw), qtype).reshape(shape)
    return values.astype(np.float16) if len(shape) == 2 else values.astype(np.float32)


def _repack_native(kind: str, raw: np.ndarray, shape) -> Optional[Converted]:
    """Q4_0/Q4_1/Q8_0 blocks of 32 -> MLX affine (w = scale * q + bias), bit-exact."""
    rows, cols = shape
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    blocks = raw.reshape(rows, cols // 32, block_bytes)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    if kind == "Q8_0":
        # int8 q -> uint8 q + 128: flipping the sign bit is exactly that.
        q = np.ascontiguousarray(blocks[..., 2:34]) ^ np.uint8(0x80)
        packed = q.reshape(rows, cols).view(np.uint32)
        bias = d.astype(np.float32) * -128.0
        bits = 8
    else:
        start = 2 if kind == "Q4_0" else 4
        qs = blocks[..., start:start + 16]
        # GGUF: byte i holds element i (low nibble) and element i + 16 (high).
        vals = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        # MLX: element j sits at bits 4 * (j % 8) of little-endian word j // 8.
        packed = (vals[..., 0::2] | (vals[..., 1::2] << 4)).astype(np.uint8)
        packed = np.ascontiguousarray(packed).reshape(rows, cols // 2).view(np.uint32)
        if kind == "Q4_0":
            bias = d.astype(np.float32) * -8.0
        else:
            bias = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
        bits = 4
    bias16 = bias.astype(np.float16)
    if not (np.isfinite(d).all() and np.isfinite(bias16).all()):
        return None  # out of float16 range: fall back to dequantizing
    return Converted({"weight": packed, "scales": d, "biases": bias16}, bits=bits, group_size=32)


def _unpermute_rows(conv: Converted, heads: int) -> Converted:
    """Undo llama.cpp's interleaved rotary row order (per head: 0, d/2, 1, d/2+1, ...)."""
    out = {}
    for key, arr in conv.arrays.items():
        rows = arr.shape[0]
        rest = arr.shape[1:]
        out[key] = np.ascontiguousarray(
            arr.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(arr.shape)
        )
    return Converted(out, conv.bits, conv.group_size, conv.bf16, conv.dequantized)


def _to_mlx(conv: Converted, requant_bits, requant_group_size) -> Tuple[dict, Optional[tuple]]:
    """numpy -> mx arrays; optionally re-quantize tensors that were dequantized."""
    import mlx.core as mx

    weight = conv.arrays["weight"]
    if conv.bf16:
        return {"weight": mx.array(weight).view(mx.bfloat16)}, None
    if (conv.dequantized and requant_bits is not None and weight.ndim == 2
            and weight.shape[1] % requant_group_size == 0):
        w = mx.array(weight.astype(np.float16))
        q, scales, biases = mx.quantize(w, group_size=requant_group_size, bits=requant_bits)
        return {"weight": q, "scales": scales, "biases": biases}, (requant_bits, requant_group_size)
    arrays = {k: mx.array(v) for k, v in conv.arrays.items()}
    quant = (conv.bits, conv.group_size) if conv.bits else None
    return arrays, quant


# ----------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------


def _write_folder(gguf: GGUFFile, plan: ImportPlan, folder: Path, requant_bits,
                  requant_group_size, progress: Optional[ProgressFn]) -> None:
    import mlx.core as mx

    items = sorted(plan.names.items(), key=lambda kv: _tensor_order(kv[1]))
    quant_params: Dict[str, tuple] = {}
    shard: Dict[str, object] = {}
    shard_bytes = 0
    shard_files: List[Path] = []
    for done, (gguf_name, mlx_name) in enumerate(items, start=1):
        conv = convert_tensor(gguf, gguf.tensors[gguf_name])
        heads = plan.permute_heads.get(gguf_name)
        if heads:
            conv = _unpermute_rows(conv, heads)
        arrays, quant = _to_mlx(conv, requant_bits, requant_group_size)
        prefix = mlx_name.rsplit(".", 1)[0]
        if quant is not None:
            quant_params[prefix] = quant
            for key, arr in arrays.items():
                shard[f"{prefix}.{key}"] = arr
        else:
            shard[mlx_name] = arrays["weight"]
        mx.eval(*arrays.values())
        shard_bytes += sum(a.nbytes for a in arrays.values())
        if shard_bytes >= SHARD_BYTES:
            shard_files.append(_save_shard(folder, len(shard_files) + 1, shard))
            shard, shard_bytes = {}, 0
        if progress is not None:
            progress(done, len(items))
    if shard or not shard_files:
        shard_files.append(_save_shard(folder, len(shard_files) + 1, shard))
    if len(shard_files) == 1:
        os.replace(shard_files[0], folder / "model.safetensors")
    config = dict(plan.config)
    quantization = _quantization_config(quant_params)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    _write_json(folder / "config.json", config)
    _write_tokenizer(folder, plan.tokenizer)


def _tensor_order(mlx_name: str):
    m = re.match(r"model\.layers\.(\d+)\.", mlx_name)
    return (int(m.group(1)) if m else -1, mlx_name)


def _save_shard(folder: Path, index: int, tensors: dict) -> Path:
    import mlx.core as mx

    path = folder / f"model-{index:05d}.safetensors"
    mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})
    return path


def _quantization_config(params: Dict[str, tuple]) -> Optional[dict]:
    """Most common (bits, group) as the default; per-module entries for the rest."""
    if not params:
        return None
    counts: Dict[tuple, int] = {}
    for p in params.values():
        counts[p] = counts.get(p, 0) + 1
    bits, group = max(counts, key=counts.get)
    config = {"group_size": group, "bits": bits, "mode": "affine"}
    for module, (b, g) in sorted(params.items()):
        if (b, g) != (bits, group):
            config[module] = {"group_size": g, "bits": b, "mode": "affine"}
    return config


def _write_tokenizer(folder: Path, tokenizer) -> None:
    (folder / "tokenizer.json").write_text(tokenizer.tokenizer_json, encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", tokenizer.tokenizer_config)
    special = {k: v for k, v in tokenizer.tokenizer_config.items()
               if k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    _write_json(folder / "special_tokens_map.json", special)
    gen = {"bos_token_id": tokenizer.bos_token_id}
    if tokenizer.eos_token_ids:
        gen["eos_token_id"] = tokenizer.eos_token_ids
    _write_json(folder / "generation_config.json", gen)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
