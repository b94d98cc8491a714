"""LoadModel `Options` ("key:value" strings) parsed into typed settings.

Values are typed by content (true/false, int, float, else string), as LocalAI
documents. Unknown keys are logged and ignored; a known key with a value of
the wrong kind fails the load with a message naming the key.
"""

import dataclasses
import logging
import math
import re
from typing import Optional

from .errors import InvalidArgument

log = logging.getLogger(__name__)

_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_value(text: str):
    """Type an option value by its content: bool, int, float, else string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(lowered)
    except ValueError:
        pass
    try:
        return float(lowered)
    except ValueError:
        return text.strip()


def parse_bytes(value) -> int:
    """Accept 123, "512MB", "2GiB", "1.5g" as a byte count."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MB")
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b)?\s*", str(value).lower())
    if not match:
        raise ValueError("expected a size such as 512MB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


@dataclasses.dataclass
class ModelSettings:
    """Everything LoadModel configures; request fields override the sampling
    defaults here, which override the built-in defaults below."""

    # Prompt cache.
    prompt_cache: bool = True
    max_cache_entries: int = 64
    cache_bytes: Optional[int] = None  # None: derived from available memory
    max_kv_size: Optional[int] = None  # rotating KV window; None = unbounded
    num_draft_tokens: int = 3  # speculative decoding with DraftModel (NDraft per request)
    prompt_lookup: bool = False  # draft from n-grams of the sequence itself, no draft model
    kv_bits: Optional[int] = None  # quantized KV cache (mlx-lm's names); None = full precision
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    prompt_cache_path: Optional[str] = None  # saved caches, found again after a restart
    prompt_cache_disk_bytes: int = 4 * 2**30  # budget of each prompt cache folder
    # Engine.
    max_batch_size: int = 16
    prefill_batch_size: int = 8
    prefill_step_size: int = 512
    max_queue: int = 256
    step_timeout: float = 600.0  # seconds a step may run before the engine is failed; 0 = never
    context_size: Optional[int] = None  # None: the model's own
    context_overflow: str = "error"  # or "truncate": drop the oldest turns to fit
    # Loading.
    dequantize: Optional[bool] = None  # None: dequantize on the CPU only
    compile_decode: bool = True  # CPU: llama blocks' decode steps and attention compiled
    gguf_cache_dir: Optional[str] = None
    gguf_requant_bits: Optional[int] = None  # re-quantize K-quants (None: keep floats)
    gguf_requant_group_size: int = 64
    trust_remote_code: bool = False
    # Several hosts (mx.distributed): rank 0 joins the group at LoadModel.
    hostfile: Optional[str] = None  # None: MLX_DISTRIBUTED_HOSTFILE, else one process
    distributed_backend: Optional[str] = None  # ring or jaccl (None: MLX_DISTRIBUTED_BACKEND)
    parallel: Optional[str] = None  # tensor or pipeline (None: tensor where it divides)
    join_timeout: float = 30.0  # seconds the workers get to answer rank 0
    distributed_step_timeout: float = 60.0  # a step's bound across ranks (a rank may hang)
    # Generation defaults.
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    seed: Optional[int] = None


_ALIASES = {"cache_size": "max_cache_entries", "batch_size": "max_batch_size"}
_BYTE_KEYS = {"cache_bytes", "prompt_cache_disk_bytes"}
# Settings whose default is None, by the kind of value they take.
_KINDS = {"max_kv_size": int, "context_size": int, "dequantize": bool, "kv_bits": int,
          "prompt_cache_path": str, "hostfile": str, "distributed_backend": str,
          "parallel": str,
          "gguf_cache_dir": str, "gguf_requant_bits": int, "seed": int}


def _coerce(key, value, default):
    """Check a parsed value against the kind of the setting's default."""
    if key in _BYTE_KEYS:
        return parse_bytes(value)
    kind = _KINDS.get(key) or type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
    else:
        value = str(value)
    return value


def parse_options(pairs) -> ModelSettings:
    """Settings from "key:value" strings over the built-in defaults."""
    settings = ModelSettings()
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(ModelSettings)}
    for pair in pairs:
        key, sep, raw = pair.partition(":")
        key = key.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if not sep:
            raise InvalidArgument(f"option {pair!r} is not of the form key:value")
        if key not in fields:
            log.warning("ignoring unknown option %r", key)
            continue
        try:
            value = _coerce(key, parse_value(raw), fields[key])
        except (ValueError, OverflowError) as err:
            raise InvalidArgument(f"option {key!r} has a bad value {raw!r}: {err}") from None
        setattr(settings, key, value)
    _validate(settings)
    return settings


# The largest value each integer setting may take: anything beyond is a typo
# that would otherwise ask for absurd memory or time.
_INT_LIMITS = {
    "max_cache_entries": 2**20, "max_batch_size": 4096, "prefill_batch_size": 4096,
    "prefill_step_size": 2**20, "max_queue": 2**20, "max_tokens": 2**31,
    "repeat_last_n": 2**20, "max_kv_size": 2**31, "context_size": 2**31,
    "cache_bytes": 2**50, "prompt_cache_disk_bytes": 2**50,
}


def _validate(s: ModelSettings):
    """Every setting within the range the engine, sampler and processors accept,
    so a bad value fails LoadModel, naming the key, and never a request later."""
    checks = [
        ("max_cache_entries", s.max_cache_entries >= 0),
        ("max_batch_size", s.max_batch_size >= 1),
        ("prefill_batch_size", s.prefill_batch_size >= 1),
        ("prefill_step_size", s.prefill_step_size >= 1),
        ("max_queue", s.max_queue >= 1),
        ("step_timeout", s.step_timeout == 0 or s.step_timeout >= 1),
        ("num_draft_tokens", 1 <= s.num_draft_tokens <= 64),
        ("max_tokens", s.max_tokens >= 1),
        ("temperature", s.temperature >= 0),
        ("top_p", 0 <= s.top_p <= 1),
        ("min_p", 0 <= s.min_p <= 1),
        ("top_k", s.top_k >= 0),
        ("repeat_last_n", s.repeat_last_n >= 0),
        ("repetition_penalty", s.repetition_penalty > 0),
        ("xtc_probability", 0 <= s.xtc_probability <= 1),
        ("xtc_threshold", 0 <= s.xtc_threshold <= 0.5),
        ("seed", s.seed is None or -1 <= s.seed < 2**64),
        ("cache_bytes", s.cache_bytes is None or s.cache_bytes >= 0),
        ("prompt_cache_disk_bytes", s.prompt_cache_disk_bytes >= 0),
        ("max_kv_size", s.max_kv_size is None or s.max_kv_size >= 1),
        ("context_size", s.context_size is None or s.context_size >= 1),
        ("context_overflow", s.context_overflow in ("error", "truncate")),
        ("gguf_requant_bits", s.gguf_requant_bits in (None, 2, 3, 4, 5, 6, 8)),
        ("gguf_requant_group_size", s.gguf_requant_group_size in (32, 64, 128)),
        ("distributed_backend", s.distributed_backend in (None, "ring", "jaccl")),
        ("parallel", s.parallel in (None, "tensor", "pipeline")),
        ("join_timeout", 1 <= s.join_timeout <= 3600),
        ("distributed_step_timeout", s.distributed_step_timeout >= 1),
    ]
    checks += [(key, getattr(s, key) is None or getattr(s, key) <= limit)
               for key, limit in _INT_LIMITS.items()]
    for key, ok in checks:
        if not ok:
            raise InvalidArgument(f"option {key!r} is out of range: {getattr(s, key)!r}"
                                  f"{_RANGE_HINTS.get(key, '')}")
    if s.seed == -1:
        s.seed = None  # llama.cpp's convention: -1 means a random seed


_RANGE_HINTS = {
    "seed": " (use 0..2^64-1, or -1 for a random seed)",
    "top_p": " (use 0..1)", "min_p": " (use 0..1)",
    "xtc_probability": " (use 0..1)", "xtc_threshold": " (use 0..0.5)",
    "repetition_penalty": " (use a number > 0; 1 = off)",
    "step_timeout": " (seconds, at least 1; 0 = no limit)",
    "distributed_backend": " (use ring or jaccl)", "parallel": " (use tensor or pipeline)",
    "join_timeout": " (seconds, 1..3600)",
}
