"""Import a GGUF file into an MLX model folder that ``mlx_lm.load`` can open.

GGUF is what most local-LLM users hold; mlx-lm wants a Hugging Face style
folder (config.json, safetensors, tokenizer.json).  ``import_gguf`` converts
once and keeps the result in a cache folder keyed by the file's identity
(real path, size, mtime) and the options that change the output, so later
loads only stat the file.

Layout of the cache: ``<cache_root>/<name>-<hash>/`` written through a temp
folder beside it and renamed into place; a marker file is written last, so a
folder without it is an interrupted import and is replaced.

The steps live in their own modules: ``reader`` parses the file,
``architecture`` plans config.json and the tensor names, ``repack`` converts
each tensor, ``tokenizer`` rebuilds tokenizer.json.  ``reader.read_gguf`` and
``repack.convert_tensor`` are looked up through their modules at call time,
so a test that patches them there sees every call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import reader, repack
from .architecture import ImportPlan, plan_import
from .reader import GGUFFile, GGUFImportError

IMPORTER_VERSION = "1"
MARKER_NAME = ".gguf-import-complete.json"
CACHE_ENV = "MLX_BACKEND_GGUF_CACHE"
SHARD_BYTES = 2 << 30

ProgressFn = Callable[[int, int], None]


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
    gguf = reader.read_gguf(path)
    plan = plan_import(gguf)
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


def _write_folder(gguf: GGUFFile, plan: ImportPlan, folder: Path, requant_bits,
                  requant_group_size, progress: Optional[ProgressFn]) -> None:
    """Tensors in layer order into ~2 GiB shards, then config and tokenizer files."""
    import mlx.core as mx

    items = sorted(plan.names.items(), key=lambda kv: _tensor_order(kv[1]))
    quant_params: Dict[str, tuple] = {}
    shard: Dict[str, object] = {}
    shard_bytes = 0
    shard_files: List[Path] = []
    for done, (gguf_name, mlx_name) in enumerate(items, start=1):
        conv = repack.convert_tensor(gguf, gguf.tensors[gguf_name])
        heads = plan.permute_heads.get(gguf_name)
        if heads:
            conv = repack.unpermute_rows(conv, heads)
        arrays, quant = repack.to_mlx(conv, requant_bits, requant_group_size)
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
