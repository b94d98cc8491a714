"""Hostile GGUF files: each must fail import fast, with bounded memory and a clear message.

Header-level attacks are written byte by byte with struct (declared counts and
sizes no honest writer would emit); semantic ones use the fixtures' GGUFWriter
with one metadata value overridden.  Every case asserts GGUFImportError naming
the file and the problem, in under 2 s and under 200 MB of memory growth.
"""

from __future__ import annotations

import resource
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as VT

import backend_pb2
from conftest import predict
from mlx_backend.gguf import GGUFImportError, import_gguf

import gguf_fixtures as fx

MAX_SECONDS = 2.0
MAX_BYTES = 200 << 20
TB = 1 << 40

# GGUF value types and ggml tensor types used below
U8, U32, STRING, ARRAY = 0, 4, 8, 9
F32 = 0


@pytest.fixture(scope="module", autouse=True)
def warm_imports(tmp_path_factory):
    """Import everything an import touches once, so timings and RSS measure the check."""
    tmp = tmp_path_factory.mktemp("warm")
    fixture = fx.write_gguf(tmp / "ok.gguf")
    import_gguf(fixture.path, tmp / "cache")


def _fails_fast(path: Path, cache: Path, *fragments: str) -> str:
    """Import must raise GGUFImportError quickly, in bounded memory, naming path and problem."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(GGUFImportError) as err:
            import_gguf(path, cache)
    finally:
        elapsed = time.perf_counter() - start
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    message = str(err.value)
    assert elapsed < MAX_SECONDS, f"took {elapsed:.2f}s: {message}"
    assert traced_peak < MAX_BYTES, f"allocated {traced_peak >> 20} MiB: {message}"
    assert rss_growth < MAX_BYTES, f"peak RSS grew {rss_growth >> 20} MiB: {message}"
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert not cache.exists() or list(cache.iterdir()) == []
    return message


# --------------------------------------------------------------------------
# Raw GGUF bytes
# --------------------------------------------------------------------------


def _s(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _tensor(name: str, dims, ggml_type: int = F32, offset: int = 0, n_dims=None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return (_s(name) + struct.pack("<I", n) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", ggml_type, offset))


def _write(tmp_path: Path, *parts: bytes, pad: int = 256) -> Path:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(b"".join(parts) + b"\0" * pad)
    return path


ARCH = _kv("general.architecture", STRING, _s("llama"))


# --------------------------------------------------------------------------
# Header-level attacks
# --------------------------------------------------------------------------


def test_huge_tensor_count(tmp_path):
    path = _write(tmp_path, _header(1 << 62, 1), ARCH)
    _fails_fast(path, tmp_path / "cache", "tensor count", str(1 << 62))


def test_tensor_count_that_cannot_fit_in_file(tmp_path):
    path = _write(tmp_path, _header(1000, 1), ARCH)
    _fails_fast(path, tmp_path / "cache", "tensor count is 1000", "cannot fit")


def test_huge_metadata_key_count(tmp_path):
    path = _write(tmp_path, _header(0, 1 << 62), ARCH)
    _fails_fast(path, tmp_path / "cache", "metadata key count", str(1 << 62))


def test_metadata_key_count_that_cannot_fit_in_file(tmp_path):
    path = _write(tmp_path, _header(0, 5000), ARCH)
    _fails_fast(path, tmp_path / "cache", "metadata key count is 5000", "cannot fit")


@pytest.mark.parametrize("elem_type,what", [(U8, "array length"), (U32, "array length"),
                                            (STRING, "string array length")],
                         ids=["uint8", "uint32", "string"])
def test_huge_array_length(tmp_path, elem_type, what):
    payload = struct.pack("<IQ", elem_type, TB)
    path = _write(tmp_path, _header(0, 2), ARCH, _kv("tokenizer.ggml.tokens", ARRAY, payload))
    _fails_fast(path, tmp_path / "cache", "tokenizer.ggml.tokens", what, str(TB))


def test_deeply_nested_arrays(tmp_path):
    nested = struct.pack("<IQ", ARRAY, 1) * 100 + struct.pack("<IQ", U8, 0)
    path = _write(tmp_path, _header(0, 2), ARCH, _kv("general.tags", ARRAY, nested))
    _fails_fast(path, tmp_path / "cache", "general.tags", "nested")


def test_huge_string_length(tmp_path):
    path = _write(tmp_path, _header(0, 1),
                  _s("general.architecture") + struct.pack("<IQ", STRING, 1 << 60))
    _fails_fast(path, tmp_path / "cache", "general.architecture", f"string of {1 << 60} bytes")


def test_metadata_string_over_cap_is_refused_before_reading(tmp_path):
    path = _write(tmp_path, _header(0, 1),
                  _s("tokenizer.chat_template") + struct.pack("<IQ", STRING, 9 << 20))
    _fails_fast(path, tmp_path / "cache", "tokenizer.chat_template", "exceeds the limit")


def test_huge_token_string(tmp_path):
    tokens = struct.pack("<IQ", STRING, 2) + _s("a") + _s(b"x" * (100 << 10))
    path = _write(tmp_path, _header(0, 2), ARCH, _kv("tokenizer.ggml.tokens", ARRAY, tokens))
    _fails_fast(path, tmp_path / "cache", "tokenizer.ggml.tokens", "element 1",
                "exceeds the limit of 65536")


def test_huge_key_length(tmp_path):
    path = _write(tmp_path, _header(0, 1), struct.pack("<Q", TB))
    _fails_fast(path, tmp_path / "cache", "metadata entry #0", f"string of {TB} bytes")


def test_duplicate_metadata_key(tmp_path):
    path = _write(tmp_path, _header(0, 2), ARCH, ARCH)
    _fails_fast(path, tmp_path / "cache", "general.architecture", "duplicate key")


def test_too_many_dimensions(tmp_path):
    path = _write(tmp_path, _header(1, 1), ARCH, _tensor("token_embd.weight", [2] * 5))
    _fails_fast(path, tmp_path / "cache", "token_embd.weight", "number of dimensions is 5")


@pytest.mark.parametrize("dims,fragment", [([0, 4], "dimension 0 is 0"),
                                           ([4, 1 << 50], "dimension 1 is 1125899906842624")],
                         ids=["zero", "huge"])
def test_bad_dimension(tmp_path, dims, fragment):
    path = _write(tmp_path, _header(1, 1), ARCH, _tensor("token_embd.weight", dims))
    _fails_fast(path, tmp_path / "cache", "token_embd.weight", fragment)


def test_tensor_declaring_terabytes_past_end_of_file(tmp_path):
    path = _write(tmp_path, _header(1, 1), ARCH, _tensor("token_embd.weight", [1 << 20, 1 << 20]))
    _fails_fast(path, tmp_path / "cache", "token_embd.weight", "past the end of the file")


def test_unknown_type_tensor_declaring_terabytes(tmp_path):
    path = _write(tmp_path, _header(1, 1), ARCH,
                  _tensor("token_embd.weight", [1 << 20, 1 << 20], ggml_type=99))
    _fails_fast(path, tmp_path / "cache", "token_embd.weight", "cannot fit in the file")


def test_misaligned_tensor_offset(tmp_path):
    path = _write(tmp_path, _header(1, 1), ARCH, _tensor("output_norm.weight", [4], offset=3))
    _fails_fast(path, tmp_path / "cache", "output_norm.weight", "not a multiple of alignment")


def test_overlapping_tensors(tmp_path):
    path = _write(tmp_path, _header(2, 1), ARCH, _tensor("a.weight", [64]),
                  _tensor("b.weight", [64], offset=128), pad=1024)
    _fails_fast(path, tmp_path / "cache", "'a.weight' and 'b.weight' overlap")


def test_duplicate_tensor_name(tmp_path):
    path = _write(tmp_path, _header(2, 1), ARCH, _tensor("a.weight", [8]),
                  _tensor("a.weight", [8], offset=32))
    _fails_fast(path, tmp_path / "cache", "'a.weight'", "duplicate tensor name")


def test_bad_alignment(tmp_path):
    path = _write(tmp_path, _header(0, 2), ARCH,
                  _kv("general.alignment", U32, struct.pack("<I", 48)))
    _fails_fast(path, tmp_path / "cache", "general.alignment 48 is not a power of two")


def test_tensor_offset_past_end_in_valid_file(tmp_path):
    """A real fixture whose last tensor's offset is moved far past the data."""
    fixture = fx.write_gguf(tmp_path / "m.gguf")
    data = bytearray(fixture.path.read_bytes())
    name = b"blk.1.ffn_down.weight"
    pos = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[pos:pos + 4], "little")
    off_pos = pos + 4 + 8 * n_dims + 4
    data[off_pos:off_pos + 8] = (TB).to_bytes(8, "little")
    fixture.path.write_bytes(bytes(data))
    _fails_fast(fixture.path, tmp_path / "cache", "blk.1.ffn_down.weight", "past the end")


# --------------------------------------------------------------------------
# Semantic attacks: a well-formed file whose metadata lies about the model
# --------------------------------------------------------------------------


def _lying(tmp_path, **extra) -> Path:
    keys = {f"llama.{k.replace('__', '.')}": v for k, v in extra.items()}
    return fx.write_gguf(tmp_path / "m.gguf", extra_keys=keys).path


def test_absurd_block_count(tmp_path):
    path = _lying(tmp_path, block_count=(10 ** 6, VT.UINT32))
    _fails_fast(path, tmp_path / "cache", "llama.block_count 1000000 declared but 2 layers present")


def test_block_count_one_more_than_present(tmp_path):
    path = _lying(tmp_path, block_count=(3, VT.UINT32))
    _fails_fast(path, tmp_path / "cache", "llama.block_count 3 declared but 2 layers present")


def test_head_count_zero(tmp_path):
    path = _lying(tmp_path, attention__head_count=(0, VT.UINT32))
    _fails_fast(path, tmp_path / "cache", "llama.attention.head_count is 0", "at least 1")


def test_head_count_kv_zero(tmp_path):
    path = _lying(tmp_path, attention__head_count_kv=(0, VT.UINT32))
    _fails_fast(path, tmp_path / "cache", "llama.attention.head_count_kv is 0")


def test_head_count_not_divisible_by_kv_heads(tmp_path):
    path = _lying(tmp_path, attention__head_count_kv=(3, VT.UINT32))
    _fails_fast(path, tmp_path / "cache",
                "llama.attention.head_count 4 is not divisible by llama.attention.head_count_kv 3")


def test_embedding_length_not_divisible_by_heads(tmp_path):
    path = _lying(tmp_path, embedding_length=(65, VT.UINT32))
    _fails_fast(path, tmp_path / "cache", "llama.embedding_length 65 is not divisible")


def test_huge_head_count(tmp_path):
    path = _lying(tmp_path, attention__head_count=(1 << 31, VT.UINT32))
    _fails_fast(path, tmp_path / "cache", "llama.attention.head_count is 2147483648")


def test_embedding_shape_mismatching_embedding_length(tmp_path):
    path = _lying(tmp_path, embedding_length=(128, VT.UINT32))
    _fails_fast(path, tmp_path / "cache", "token_embd.weight", "[300, 64]",
                "llama.embedding_length=128", "[300, 128]")


def test_attention_shape_mismatching_heads(tmp_path):
    path = _lying(tmp_path, attention__head_count_kv=(1, VT.UINT32))
    _fails_fast(path, tmp_path / "cache", "blk.0.attn_k.weight", "[32, 64]",
                "head_count_kv=1", "[16, 64]")


def test_ffn_shape_mismatching_feed_forward_length(tmp_path):
    path = _lying(tmp_path, feed_forward_length=(4096, VT.UINT32))
    _fails_fast(path, tmp_path / "cache", "blk.0.ffn_gate.weight", "feed_forward_length=4096")


def test_vocab_larger_than_embedding(tmp_path):
    path = fx.write_gguf(tmp_path / "m.gguf", vocab=fx.bpe_vocab(pad_to=4000),
                         embedding_rows=300).path
    _fails_fast(path, tmp_path / "cache", "vocabulary size mismatch", "4000", "300")


def test_vocab_of_numbers(tmp_path):
    path = fx.write_gguf(tmp_path / "m.gguf", extra_keys={
        "tokenizer.ggml.tokens": (list(range(300)), VT.ARRAY, VT.UINT32)}).path
    _fails_fast(path, tmp_path / "cache", "tokenizer.ggml.tokens is not an array of strings")


def test_metadata_of_wrong_type(tmp_path):
    path = _lying(tmp_path, attention__head_count=("four", VT.STRING))
    _fails_fast(path, tmp_path / "cache", "llama.attention.head_count must be an integer")


def test_nan_epsilon(tmp_path):
    path = _lying(tmp_path, attention__layer_norm_rms_epsilon=(float("nan"), VT.FLOAT32))
    _fails_fast(path, tmp_path / "cache", "llama.attention.layer_norm_rms_epsilon",
                "positive number")


def test_rope_freqs_of_wrong_length(tmp_path):
    path = fx.write_gguf(tmp_path / "m.gguf", rope_factors=np.full(5, 2.0)).path
    _fails_fast(path, tmp_path / "cache", "rope_freqs.weight", "[5]", "[8]")


# --------------------------------------------------------------------------
# End to end: the backend reports the failure and keeps serving
# --------------------------------------------------------------------------


def test_server_rejects_hostile_gguf_then_loads_valid_model(tmp_path, server_factory, tiny_model):
    path = _lying(tmp_path, block_count=(10 ** 6, VT.UINT32))
    server = server_factory()
    start = time.perf_counter()
    result = server.stub.LoadModel(backend_pb2.ModelOptions(Model=str(path)), timeout=60)
    elapsed = time.perf_counter() - start
    assert not result.success
    assert str(path) in result.message
    assert "block_count 1000000 declared but 2 layers present" in result.message, result.message
    assert elapsed < 10, f"LoadModel took {elapsed:.1f}s"
    server.load(tiny_model)
    reply = predict(server.stub, "Hello", Tokens=8, IgnoreEOS=True)
    assert reply.tokens == 8 and reply.message
