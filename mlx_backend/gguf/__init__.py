"""GGUF files as MLX model folders: parse, plan, convert, cache.

``import_gguf(path)`` returns a folder ``mlx_lm.load`` can open, converting the
file on first use and reusing the cached folder afterwards.  The modules, in
the order an import runs through them:

- ``reader``: the GGUF header, metadata and tensor table, bounds-checked
  against hostile files; ``is_gguf`` and the one magic check.
- ``architecture``: metadata -> config.json, GGUF -> mlx-lm tensor names, and
  the checks that the two agree.
- ``tokenizer``: tokenizer.json / tokenizer_config.json from the vocabulary.
- ``repack``: each tensor to MLX arrays (copy, bit-exact repack, dequantize,
  re-quantize, un-interleave rotary rows).
- ``importer``: the entry point and the cache folder.
"""

from .importer import CACHE_ENV, MARKER_NAME, default_cache_root, import_gguf
from .reader import GGUFImportError, is_gguf, read_gguf

__all__ = [
    "CACHE_ENV",
    "GGUFImportError",
    "MARKER_NAME",
    "default_cache_root",
    "import_gguf",
    "is_gguf",
    "read_gguf",
]
