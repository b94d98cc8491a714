"""Prompt caches on disk, so a restarted backend answers known prompts warm.

LocalAI sends `PromptCachePath` (from a model YAML's `prompt_cache_path`) on
every request. Cached prompts (system-prompt checkpoints; with
`PromptCacheAll` every finished turn too) are saved there, one safetensors
file per token sequence, the way `mlx_lm.cache_prompt` stores a KV cache.
The file's metadata names the model it was computed with and its tokens, and
both are checked before anything is served: a corrupt, truncated or foreign
file is skipped with a log line. Writes go to a temporary file renamed into
place, and the folder is kept under a byte budget, oldest files first.
"""

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from .kv_cache import kv_length

log = logging.getLogger(__name__)

FORMAT = "mlx-backend-prompt-cache-1"
SUFFIX = ".safetensors"
_PARTIAL = ".partial-"


def model_identity(loaded) -> str:
    """A fingerprint of the loaded weights: a file saved under another model
    (or another version of the same file, or with other LoRA adapters or
    scales) is never served."""
    from .adapters import stamp as adapter_stamp

    source = loaded.source
    try:
        stat = os.stat(os.path.join(source, "config.json") if os.path.isdir(source) else source)
        stamp = [stat.st_size, stat.st_mtime_ns]
    except OSError:  # a hub id: its revision is in the name
        stamp = []
    facts = [os.path.abspath(source) if os.path.exists(source) else source, stamp,
             loaded.weight_format, loaded.weights_bytes, loaded.context_length,
             len(loaded.tokenizer)]
    # Adapters with scale 0 change nothing: the base model's caches fit.
    adapters = [[path, scale, adapter_stamp(path)]
                for path, scale in getattr(loaded, "adapters", None) or [] if scale != 0]
    if adapters:  # without adapters the identity is what it always was
        facts.append({"lora": adapters})
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:32]


class PromptStore:
    """One folder of saved prompt caches for one model."""

    def __init__(self, folder: str, identity: str, max_bytes: int):
        self.folder = Path(folder)
        self.identity = identity
        self.max_bytes = max_bytes

    def _path(self, tokens: List[int]) -> Path:
        digest = hashlib.sha256(f"{self.identity}:{tokens}".encode()).hexdigest()[:40]
        return self.folder / f"{digest}{SUFFIX}"

    def load(self, budget: int) -> Iterator[Tuple[List[int], list]]:
        """Saved caches of this model, newest first, up to `budget` bytes."""
        try:
            files = sorted(_saved(self.folder), key=_mtime, reverse=True)
        except OSError as err:
            log.warning("prompt cache folder %s: %s", self.folder, err)
            return
        for path in files:
            if budget <= 0:
                return
            found = self._read(path)
            if found is not None:
                budget -= path.stat().st_size
                yield found

    def _read(self, path: Path) -> Optional[Tuple[List[int], list]]:
        try:
            cache, metadata = load_prompt_cache(str(path), return_metadata=True)
            if metadata.get("format") != FORMAT:
                raise ValueError("not a file this backend wrote")
            if metadata.get("model") != self.identity:
                log.info("prompt cache %s is for another model; skipped", path.name)
                return None
            tokens = json.loads(metadata["tokens"])
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ValueError("bad token list")
            if kv_length(cache) != len(tokens) or self._path(tokens) != path:
                raise ValueError("KV length or name does not match its tokens")
            mx.eval([layer.state for layer in cache])
        except Exception as err:  # corrupt or truncated: never served
            log.warning("prompt cache %s is unreadable (%s: %s); skipped",
                        path.name, type(err).__name__, err)
            return None
        return tokens, cache

    def save(self, tokens: List[int], cache) -> None:
        """Write atomically; a known sequence only has its file's time renewed."""
        path = self._path(tokens)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if path.exists():
                os.utime(path)
                return
            tmp = path.with_name(f"{path.stem}{_PARTIAL}{os.getpid()}{SUFFIX}")
            save_prompt_cache(str(tmp), cache, {
                "format": FORMAT, "model": self.identity, "tokens": json.dumps(tokens)})
            os.replace(tmp, path)
            self._enforce_budget()
        except OSError as err:  # a full or read-only disk costs the save, not the request
            log.warning("could not save a prompt cache to %s: %s", self.folder, err)

    def _enforce_budget(self) -> None:
        files = sorted(_saved(self.folder), key=_mtime)
        total = sum(_size(f) for f in files)
        for path in files:
            if total <= self.max_bytes:
                break
            total -= _size(path)
            path.unlink(missing_ok=True)


def _saved(folder: Path) -> List[Path]:
    """Finished files only: a write in progress is not a cache yet."""
    return [p for p in folder.glob(f"*{SUFFIX}") if _PARTIAL not in p.name]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
