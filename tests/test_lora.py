"""LoRA adapters (LoraAdapter(s) / LoraScale(s)): mlx-lm adapter folders and
llama.cpp GGUF LoRA files, merged into the served model.

Adapters are built on the fly: random LoRA weights on the tiny model, saved
the way `mlx_lm.lora` saves them (adapter_config.json + adapters.safetensors
of the trainable LoRA parameters). References are computed here: mlx-lm's
own `fuse()` for one adapter, `W + sum(scale_i * B_i^T A_i^T)` for several,
and llama.cpp's semantics (GGUF layout, interleaved rotary rows) through the
numpy forward of gguf_fixtures for GGUF LoRA.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

import gguf_fixtures as fx
from conftest import predict
from mlx_backend import adapters as lora
from mlx_backend.errors import NotFound
from mlx_backend.model_loader import LoadError, load_model
from mlx_backend.options import parse_options
from mlx_backend.prompt_store import model_identity
from mlx_backend.request import LoadRequest
from tiny_model import build_tiny_model

PROMPTS = ["Hello world", "The quick brown fox", "def main():", "Paris is"]
N = 24
GGUF_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.down_proj"]
GGUF_KINDS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.down_proj": "ffn_down"}


# ---- building adapters and references --------------------------------------------------------


def make_adapter(folder, base, seed, rank=4, scale=2.0, num_layers=2, keys=None,
                 magnitude=0.3):
    """An adapter as mlx_lm.lora saves one: LoRA layers on the frozen base,
    random (non-zero) lora_b, the trainable parameters saved."""
    import mlx_lm
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(str(base))
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys:
        params["keys"] = keys
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(seed)
    model.load_weights([(n, magnitude * mx.random.normal(p.shape))
                        for n, p in tree_flatten(model.trainable_parameters())
                        if n.endswith("lora_b")], strict=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params,
         "adapter_path": str(folder)}))
    return folder


def copy_model(base, dest, weights):
    """A copy of the model folder with other weights."""
    dest = Path(dest)
    shutil.copytree(base, dest)
    mx.save_safetensors(str(dest / "model.safetensors"), weights)
    return dest


def mlx_lm_fused(base, adapter, dest):
    """mlx-lm's own route: load with adapter_path, fuse every LoRA layer, save."""
    import mlx_lm

    model, _ = mlx_lm.load(str(base), adapter_path=str(adapter))
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    return copy_model(base, dest, dict(tree_flatten(model.parameters())))


def composed(base, adapters, dest):
    """W + sum_i (s_i * scale_i * B_i^T) @ A_i^T, the sum taken first (float32)."""
    weights = mx.load(str(Path(base) / "model.safetensors"))
    deltas = {}
    for folder, s in adapters:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        coef = s * config["lora_parameters"]["scale"]
        tensors = mx.load(str(Path(folder) / "adapters.safetensors"))
        for name, a in tensors.items():
            if name.endswith(".lora_a"):
                module = name[: -len(".lora_a")]
                d = ((coef * tensors[f"{module}.lora_b"].T) @ a.T).astype(mx.float32)
                deltas[module] = deltas[module] + d if module in deltas else d
    for module, d in deltas.items():
        w = weights[f"{module}.weight"]
        weights[f"{module}.weight"] = w + d.astype(w.dtype)
    return copy_model(base, dest, weights)


def quantized_copy(base, dest, bits=8, group_size=32):
    import mlx_lm

    model, _ = mlx_lm.load(str(base))
    nn.quantize(model, group_size=group_size, bits=bits)
    dest = copy_model(base, dest, dict(tree_flatten(model.parameters())))
    config = json.loads((dest / "config.json").read_text())
    config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def load(folder, *options, adapters=(), scales=(), model_path=""):
    return load_model(LoadRequest(model=str(folder), model_path=model_path,
                                  options=list(options),
                                  lora_adapters=[str(a) for a in adapters],
                                  lora_scales=list(scales) or [1.0] * len(adapters)),
                      parse_options(list(options)))


def greedy(server, prompts=PROMPTS, n=N):
    return [predict(server.stub, p, Tokens=n, IgnoreEOS=True, Temperature=0.0).message
            for p in prompts]


def serve(server, model, adapters=(), scales=(), options=(), **fields):
    if adapters:
        fields["LoraAdapters"] = [str(a) for a in adapters]
    if scales:
        fields["LoraScales"] = list(scales)
    result = server.load(model, options=options, **fields)
    return result


def logits(model, tokens):
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def a1(work, tiny_model):
    return make_adapter(work / "a1", tiny_model, seed=1)


@pytest.fixture(scope="module")
def a2(work, tiny_model):  # other keys, rank and scale: only attention, last layer
    return make_adapter(work / "a2", tiny_model, seed=2, rank=8, scale=1.5, num_layers=1,
                        keys=["self_attn.q_proj", "self_attn.v_proj"])


@pytest.fixture(scope="module")
def base_tokens(server, tiny_model):
    serve(server, tiny_model)
    return greedy(server)


# ---- the served tokens -----------------------------------------------------------------------


def test_adapter_equals_mlx_lm_fused_model(server, tiny_model, a1, work, base_tokens):
    reference = mlx_lm_fused(tiny_model, a1, work / "fused-a1")
    serve(server, reference)
    expected = greedy(server)
    result = serve(server, tiny_model, adapters=[a1])
    assert result.success
    got = greedy(server)
    assert got == expected
    assert got != base_tokens  # the adapter does change the model
    assert f"LoRA adapters: {a1} x1" in server.log_text()


def test_two_adapters_compose_with_their_scales(server, tiny_model, a1, a2, work, base_tokens):
    reference = composed(tiny_model, [(a1, 0.6), (a2, -0.8)], work / "composed")
    serve(server, reference)
    expected = greedy(server)
    serve(server, tiny_model, adapters=[a1, a2], scales=[0.6, -0.8])
    assert greedy(server) == expected
    serve(server, tiny_model, adapters=[a2, a1], scales=[-0.8, 0.6])  # order does not matter
    assert greedy(server) == expected
    assert expected != base_tokens


def test_single_adapter_scale(server, tiny_model, a1, work):
    """LoraAdapter + LoraScale (the single-adapter fields) scale the delta."""
    reference = composed(tiny_model, [(a1, 0.5)], work / "half-a1")
    serve(server, reference)
    expected = greedy(server)
    server.load(tiny_model, LoraAdapter=str(a1), LoraScale=0.5)
    assert greedy(server) == expected


def test_scale_zero_gives_the_base_model(server, tiny_model, a1, a2, base_tokens, work):
    serve(server, tiny_model, adapters=[a1], scales=[0.0])
    assert greedy(server) == base_tokens
    reference = composed(tiny_model, [(a2, 1.0)], work / "only-a2")
    serve(server, reference)
    expected = greedy(server)
    serve(server, tiny_model, adapters=[a1, a2], scales=[0.0, 1.0])
    assert greedy(server) == expected


def test_relative_path_resolved_against_model_path(server, tiny_model, a1, work):
    serve(server, tiny_model, adapters=[a1])
    expected = greedy(server)
    models = work / "models"
    (models / "loras").mkdir(parents=True)
    shutil.copytree(a1, models / "loras" / "mine")
    serve(server, tiny_model, adapters=["loras/mine"], ModelPath=str(models))
    assert greedy(server) == expected
    result = server.stub.LoadModel(fx_options(tiny_model, LoraAdapter="loras/absent",
                                              ModelPath=str(models)))
    assert not result.success
    assert "loras/absent" in result.message and str(models / "loras" / "absent") in result.message


def fx_options(model, **fields):
    import backend_pb2

    return backend_pb2.ModelOptions(Model=str(model), **fields)


def test_batched_streams_with_an_adapter_equal_their_solo_runs(server, tiny_model, a1, a2):
    import backend_pb2

    serve(server, tiny_model, adapters=[a1, a2], scales=[1.0, 0.5],
          options=["prompt_cache:false", "max_batch_size:8"])

    def run(prompt, n):
        call = server.stub.PredictStream(backend_pb2.PredictOptions(
            Prompt=prompt, Tokens=n, IgnoreEOS=True, Temperature=0.0), timeout=120)
        return b"".join(chunk.message for chunk in call)

    lengths = [40, 17, 33, 25]
    solo = [run(p, n) for p, n in zip(PROMPTS, lengths)]
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, run(PROMPTS[i], lengths[i]))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == solo


# ---- bad adapters ----------------------------------------------------------------------------


def _edit_tensors(src, dest, edit):
    shutil.copytree(src, dest)
    tensors = dict(mx.load(str(dest / "adapters.safetensors")))
    edit(tensors)
    mx.save_safetensors(str(dest / "adapters.safetensors"), tensors)
    return dest


def _edit_config(src, dest, edit):
    shutil.copytree(src, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    edit(config)
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


Q = "model.layers.1.self_attn.q_proj"


def _bad_adapters(work, tiny_model, a1):
    """name -> (path, words the message must hold); every one is caught by the
    pre-check `adapters.check`, before any weight is loaded."""
    root = work / "bad"
    root.mkdir()
    empty = root / "empty"
    empty.mkdir()
    not_adapter = root / "model.gguf"
    fx.write_gguf(not_adapter)
    peft = root / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (peft / "adapter_model.safetensors").write_bytes(b"")
    other_dims = build_tiny_model(root / "base-32", hidden_size=32)
    more_layers = build_tiny_model(root / "base-4l", num_layers=4)
    return {
        "missing": (root / "nope", ["not found", "nope"]),
        "not an adapter folder": (empty, ["adapter_config.json"]),
        "a model, not an adapter": (not_adapter, ["not an adapter"]),
        "rank differs from config": (_edit_config(a1, root / "rank", lambda c: c[
            "lora_parameters"].update(rank=8)), ["rank 8"]),
        "half a pair": (_edit_tensors(a1, root / "half", lambda t: t.pop(f"{Q}.lora_b")),
                        [Q, "no lora_b"]),
        "wrong shape": (_edit_tensors(a1, root / "shape", lambda t: t.update(
            {f"{Q}.lora_a": mx.zeros((65, 4))})), [Q, "64x65", "another base"]),
        "another base (dims)": (make_adapter(root / "dims", other_dims, seed=3),
                                ["does not fit the base", "another base"]),
        "another base (layers)": (make_adapter(root / "layers", more_layers, seed=3,
                                               num_layers=4),
                                  ["layer 2", "2 layers", "another base"]),
        "PEFT": (peft, ["PEFT", "convert_lora_to_gguf"]),
        "DoRA": (_edit_config(a1, root / "dora", lambda c: c.update(fine_tune_type="dora")),
                 ["DoRA"]),
    }


@pytest.fixture(scope="module")
def bad_adapters(work, tiny_model, a1):
    return _bad_adapters(work, tiny_model, a1)


BAD = ["missing", "not an adapter folder", "a model, not an adapter", "rank differs from config",
       "half a pair", "wrong shape", "another base (dims)", "another base (layers)", "PEFT",
       "DoRA"]


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_fails_load_with_a_clear_message(server, tiny_model, bad_adapters, case):
    path, words = bad_adapters[case]
    with pytest.raises((LoadError, NotFound)) as info:  # the cheap pre-check catches it
        lora.check(LoadRequest(model=str(tiny_model), lora_adapters=[str(path)],
                               lora_scales=[1.0]))
    result = server.stub.LoadModel(fx_options(tiny_model, LoraAdapter=str(path)))
    assert not result.success
    assert result.message == str(info.value)
    assert "LoRA adapter" in result.message and path.name in result.message
    for word in words:
        assert word in result.message, result.message


def test_misnamed_layer_is_caught_by_the_full_load(server, tiny_model, a1, work):
    """A tensor for a layer the base has no file tensor for passes the header
    pre-check (mlx-lm may rename layers at load) and fails in mlx-lm's check."""
    bad = _edit_tensors(a1, work / "misnamed", lambda t: t.update(
        {"model.layers.1.self_attn.qq_proj.lora_a": mx.zeros((64, 4)),
         "model.layers.1.self_attn.qq_proj.lora_b": mx.zeros((4, 64))}))
    lora.check(LoadRequest(model=str(tiny_model), lora_adapters=[str(bad)], lora_scales=[1.0]))
    result = server.stub.LoadModel(fx_options(tiny_model, LoraAdapter=str(bad)))
    assert not result.success
    assert "qq_proj.lora_a' is not a LoRA layer of this model" in result.message
    assert str(bad) in result.message


# ---- in process: identity, quantized bases ---------------------------------------------------


def test_prompt_cache_identity_includes_adapters_and_scales(tiny_model, a1, a2, work):
    base = load(tiny_model)
    with_a1 = load(tiny_model, adapters=[a1])
    assert with_a1.adapters == [(str(a1), 1.0)]
    ids = {model_identity(base), model_identity(with_a1),
           model_identity(dataclasses.replace(with_a1, adapters=[(str(a1), 0.5)])),
           model_identity(dataclasses.replace(with_a1, adapters=[(str(a1), 1.0),
                                                                 (str(a2), 1.0)]))}
    assert len(ids) == 4
    # scale 0 changes nothing, so the base model's saved caches fit it
    assert model_identity(load(tiny_model, adapters=[a1], scales=[0.0])) == model_identity(base)
    # a retrained adapter at the same path is another model
    copy = shutil.copytree(a1, work / "retrained")
    before = model_identity(dataclasses.replace(with_a1, adapters=[(str(copy), 1.0)]))
    stat = os.stat(copy / "adapters.safetensors")
    os.utime(copy / "adapters.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert model_identity(dataclasses.replace(with_a1, adapters=[(str(copy), 1.0)])) != before


def test_fused_weights_equal_mlx_lm_fuse_exactly(tiny_model, a1):
    import mlx_lm

    got = dict(tree_flatten(load(tiny_model, adapters=[a1]).model.parameters()))
    model, _ = mlx_lm.load(str(tiny_model), adapter_path=str(a1))
    model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules()
                                         if hasattr(m, "fuse")]))
    want = dict(tree_flatten(model.parameters()))
    assert got.keys() == want.keys()  # a plain model: no LoRA layers left
    assert all(mx.array_equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def quantized(work, tiny_model):
    return quantized_copy(tiny_model, work / "q8")


def test_quantized_base_kept_quantized_gets_unfused_lora(quantized, a1, a2):
    import mlx_lm
    from mlx_lm.tuner.lora import LoRALinear

    tokens = [5, 60, 7, 200, 31, 9]
    got = load(quantized, "dequantize:false", adapters=[a1])
    layer = got.model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.linear, nn.QuantizedLinear)
    ref, _ = mlx_lm.load(str(quantized), adapter_path=str(a1))  # mlx-lm's own LoRA model
    assert np.array_equal(logits(got.model, tokens), logits(ref, tokens))
    # several adapters: stacked along the rank, each scaled
    two = load(quantized, "dequantize:false", adapters=[a1, a2], scales=[0.6, -0.8])
    layer = two.model.model.layers[1].self_attn.q_proj
    base_layer = load(quantized, "dequantize:false").model.model.layers[1].self_attn.q_proj
    x = mx.random.normal((3, 64))
    want = base_layer(x)
    for folder, s in ((a1, 0.6), (a2, -0.8)):
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        t = mx.load(str(Path(folder) / "adapters.safetensors"))
        want = want + s * config["lora_parameters"]["scale"] * (
            (x @ t[f"{Q}.lora_a"]) @ t[f"{Q}.lora_b"])
    assert np.allclose(np.array(layer(x)), np.array(want), atol=1e-5)
    # the CPU fast path (dequantized float32, fused) computes the same model
    fused = load(quantized, adapters=[a1, a2], scales=[0.6, -0.8])
    assert fused.weight_format.startswith("float32")
    assert np.allclose(logits(fused.model, tokens), logits(two.model, tokens), atol=1e-3)


# ---- GGUF LoRA -------------------------------------------------------------------------------

SPEC = fx.Spec(hidden=64, heads=4, kv_heads=2, ffn=128, layers=2)
ALPHA, RANK = 8.0, 4


def hf_to_gguf_rows(w, heads):
    """llama.cpp's converter (LlamaModel.permute): HF rows -> interleaved rotary rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def gguf_lora_factors(spec, seed=5):
    """Random factors in HF row order: {(layer, key): (A (r, in), B_hf (out, r))}."""
    rng = np.random.default_rng(seed)
    hd = spec.hd
    dims = {"self_attn.q_proj": (spec.heads * hd, spec.hidden),
            "self_attn.k_proj": (spec.kv_heads * hd, spec.hidden),
            "self_attn.v_proj": (spec.kv_heads * hd, spec.hidden),
            "self_attn.o_proj": (spec.hidden, spec.heads * hd),
            "mlp.down_proj": (spec.hidden, spec.ffn)}
    return {(i, key): ((rng.standard_normal((RANK, inp)) / np.sqrt(inp)).astype(np.float32),
                       (0.5 * rng.standard_normal((out, RANK))).astype(np.float32))
            for i in range(spec.layers) for key, (out, inp) in dims.items()}


def to_gguf_layout(factors, spec):
    """GGUF tensor name -> array, as convert_lora_to_gguf.py writes a llama LoRA."""
    out = {}
    for (i, key), (a, b) in factors.items():
        kind = GGUF_KINDS[key]
        if kind == "attn_q":
            b = hf_to_gguf_rows(b, spec.heads)
        elif kind == "attn_k":
            b = hf_to_gguf_rows(b, spec.kv_heads)
        out[f"blk.{i}.{kind}.weight.lora_a"] = a
        out[f"blk.{i}.{kind}.weight.lora_b"] = b
    return out


def write_gguf_lora(path, tensors, alpha=ALPHA, arch="llama", extra=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    for name, arr in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_mlx_equivalent(folder, factors, scale):
    folder = Path(folder)
    folder.mkdir(parents=True)
    tensors = {}
    for (i, key), (a, b) in factors.items():
        tensors[f"model.layers.{i}.{key}.lora_a"] = mx.array(np.ascontiguousarray(a.T))
        tensors[f"model.layers.{i}.{key}.lora_b"] = mx.array(np.ascontiguousarray(b.T))
    mx.save_safetensors(str(folder / "adapters.safetensors"), tensors)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": -1,
         "lora_parameters": {"rank": RANK, "scale": scale, "dropout": 0.0,
                             "keys": GGUF_KEYS}}))
    return folder


@pytest.fixture(scope="module")
def gguf_case(work):
    root = work / "gguf"
    root.mkdir()
    fixture = fx.write_gguf(root / "base.gguf", SPEC)
    factors = gguf_lora_factors(SPEC)
    adapter = write_gguf_lora(root / "lora.gguf", to_gguf_layout(factors, SPEC))
    equivalent = write_mlx_equivalent(root / "mlx-lora", factors, ALPHA / RANK)
    return fixture, factors, adapter, equivalent


def test_gguf_lora_matches_llama_cpp_semantics(gguf_case, work):
    """Logits against the numpy forward in GGUF layout, with W += s*alpha/r*B@A
    on the file's own (interleaved) rows, as llama.cpp applies a LoRA."""
    fixture, _, adapter, _ = gguf_case
    s = 0.75
    weights = dict(fixture.weights)
    tensors = to_gguf_layout(gguf_lora_factors(SPEC), SPEC)
    for name in list(tensors):
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            weights[base] = weights[base] + s * ALPHA / RANK * (
                tensors[f"{base}.lora_b"] @ tensors[name])
    reference = dataclasses.replace(fixture, weights=weights)
    got = load(fixture.path, f"gguf_cache_dir:{work / 'gguf-cache'}", adapters=[adapter],
               scales=[s])
    tokens = [5, 77, 260, 3, 101, 290, 42, 7]
    want = fx.reference_logits(reference, tokens)
    plain = fx.reference_logits(fixture, tokens)
    out = logits(got.model, tokens)
    scale = float(np.abs(want).max())
    assert float(np.abs(out - want).max()) <= 1e-4 * scale
    assert float(np.abs(want - plain).max()) > 0.05 * scale  # the LoRA matters


def test_gguf_lora_equals_its_mlx_adapter_equivalent(server, gguf_case):
    fixture, _, adapter, equivalent = gguf_case
    prompts = ["hello world", "the world", "hello"]
    serve(server, fixture.path)
    plain = greedy(server, prompts)
    serve(server, fixture.path, adapters=[equivalent], scales=[0.9])
    expected = greedy(server, prompts)
    serve(server, fixture.path, adapters=[adapter], scales=[0.9])
    assert greedy(server, prompts) == expected
    assert expected != plain


def test_bad_gguf_loras_are_refused_by_the_pre_check(gguf_case, work, tiny_model):
    fixture, factors, adapter, _ = gguf_case
    root = work / "bad-gguf"
    root.mkdir()
    tensors = to_gguf_layout(factors, SPEC)
    other = fx.Spec(hidden=32, heads=4, kv_heads=2, ffn=64)
    cases = {
        "another arch": (write_gguf_lora(root / "qwen.gguf", tensors, arch="qwen2"),
                         ["'qwen2'", "'llama'", "another base"]),
        "another base": (write_gguf_lora(root / "small.gguf",
                                         to_gguf_layout(gguf_lora_factors(other), other)),
                         ["blk.0.attn_k.weight", "another base"]),
        "half a pair": (write_gguf_lora(root / "half.gguf", {
            k: v for k, v in tensors.items() if k != "blk.1.attn_v.weight.lora_b"}),
            ["blk.1.attn_v.weight", "missing one component"]),
        "token_embd": (write_gguf_lora(root / "embd.gguf", {
            **tensors, "token_embd.weight.lora_a": np.zeros((300, RANK)),
            "token_embd.weight.lora_b": np.zeros((64, RANK))}), ["token_embd"]),
        "tied output": (write_gguf_lora(root / "out.gguf", {
            **tensors, "output.weight.lora_a": np.zeros((RANK, 64)),
            "output.weight.lora_b": np.zeros((300, RANK))}), ["output.weight", "tied"]),
        "aLoRA": (write_gguf_lora(root / "alora.gguf", tensors,
                                  extra={"adapter.alora.invocation_tokens": "x"}), ["aLoRA"]),
    }
    for name, (path, words) in cases.items():
        with pytest.raises(LoadError) as info:
            lora.check(LoadRequest(model=str(fixture.path), lora_adapters=[str(path)],
                                   lora_scales=[1.0]))
        for word in words:
            assert word in str(info.value), (name, str(info.value))
    # the same checks hold against an MLX folder of the same architecture
    with pytest.raises(LoadError, match="does not fit the base"):
        lora.check(LoadRequest(model=str(build_tiny_model(root / "tiny-32", hidden_size=32)),
                               lora_adapters=[str(adapter)], lora_scales=[1.0]))
