"""mlx_backend/options.py: LoadModel "key:value" options typed, checked and
turned into ModelSettings; every bad value fails naming its key."""

import dataclasses
import logging
import math

import pytest

from mlx_backend.errors import InvalidArgument
from mlx_backend.options import ModelSettings, parse_bytes, parse_options, parse_value


def rejected(*pairs) -> str:
    with pytest.raises(InvalidArgument) as info:
        parse_options(list(pairs))
    return str(info.value)


# ---- parse_value ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("true", True), ("FALSE", False), (" True ", True),
    ("42", 42), ("-1", -1), (" 7 ", 7), ("0", 0),
    ("0.5", 0.5), ("1e3", 1000.0), ("-2.25", -2.25),
    ("abc", "abc"), (" /models/x ", "/models/x"), ("truthy", "truthy"), ("", ""),
    ("0x10", "0x10"),
])
def test_parse_value_types_by_content(text, expected):
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


def test_parse_value_non_finite_floats_stay_floats():
    assert math.isnan(parse_value("nan"))
    assert parse_value("inf") == math.inf
    assert parse_value("1e400") == math.inf  # overflows to inf: the range checks catch it


# ---- parse_bytes ----------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (123, 123), (2.9, 2), ("123", 123), (" 7 ", 7),
    ("10k", 10 * 2**10), ("4 kb", 4 * 2**10), ("512MB", 512 * 2**20), ("512m", 512 * 2**20),
    ("2GiB", 2 * 2**30), ("1.5g", int(1.5 * 2**30)), ("1T", 2**40), ("3b", 3),
])
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", [True, False, "lots", "5PB", "-5MB", "MB", "1.2.3", "."])
def test_parse_bytes_rejects(value):
    with pytest.raises(ValueError):
        parse_bytes(value)


# ---- parse_options: types, aliases, unknown keys ---------------------------------------------

def test_no_options_are_the_defaults():
    assert parse_options([]) == ModelSettings()


def test_values_are_typed_as_their_setting():
    s = parse_options(["max_batch_size:4", "temperature:1", "top_p:0.5", "prompt_cache:false",
                       "dequantize:true", "gguf_cache_dir:/tmp/a:b", "context_overflow:truncate",
                       "cache_bytes:512MB", "max_kv_size:128", "seed:7", "step_timeout:2",
                       "prompt_cache_disk_bytes:1GiB", "prompt_cache_path:/var/cache/p"])
    assert (s.max_batch_size, s.temperature, s.top_p) == (4, 1.0, 0.5)
    assert type(s.temperature) is float and type(s.step_timeout) is float
    assert s.prompt_cache is False and s.dequantize is True
    assert s.gguf_cache_dir == "/tmp/a:b"  # only the first colon separates
    assert s.context_overflow == "truncate"
    assert s.cache_bytes == 512 * 2**20
    assert (s.max_kv_size, s.seed, s.step_timeout) == (128, 7, 2.0)
    assert s.prompt_cache_disk_bytes == 2**30 and s.prompt_cache_path == "/var/cache/p"


def test_a_string_setting_takes_any_value_as_text():
    assert parse_options(["gguf_cache_dir:123"]).gguf_cache_dir == "123"


def test_keys_are_normalised_and_aliased():
    s = parse_options(["Max-Queue : 3", "cache_size:5", "batch_size:2", " TOP_K:9"])
    assert (s.max_queue, s.max_cache_entries, s.max_batch_size, s.top_k) == (3, 5, 2, 9)


def test_later_options_override_earlier_ones():
    assert parse_options(["top_k:3", "top_k:5"]).top_k == 5
    assert parse_options(["batch_size:2", "max_batch_size:6"]).max_batch_size == 6


def test_unknown_keys_are_logged_and_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="mlx_backend.options"):
        s = parse_options(["no_such_thing:1", "gpu_layers:99", "top_k:4"])
    assert s == dataclasses.replace(ModelSettings(), top_k=4)
    assert "no_such_thing" in caplog.text and "gpu_layers" in caplog.text


def test_an_option_without_a_colon_is_rejected():
    message = rejected("top_k=4")
    assert "'top_k=4'" in message and "key:value" in message


@pytest.mark.parametrize("pair, reason", [
    ("max_batch_size:abc", "expected an integer"),
    ("max_batch_size:2.5", "expected an integer"),
    ("max_batch_size:true", "expected an integer"),
    ("seed:1.0", "expected an integer"),
    ("prompt_cache:1", "expected true or false"),
    ("dequantize:yes", "expected true or false"),
    ("temperature:hot", "expected a number"),
    ("temperature:false", "expected a number"),
    ("cache_bytes:lots", "expected a size"),
    ("cache_bytes:true", "expected a size"),
    ("prompt_cache_disk_bytes:lots", "expected a size"),
])
def test_wrong_kind_of_value_names_the_key(pair, reason):
    key, _, raw = pair.partition(":")
    message = rejected(pair)
    assert message.startswith(f"option {key!r} has a bad value {raw!r}: "), message
    assert reason in message


@pytest.mark.parametrize("key", ["temperature", "top_p", "min_p", "repetition_penalty",
                                 "presence_penalty", "xtc_threshold", "step_timeout",
                                 "max_tokens", "seed", "cache_bytes", "max_kv_size"])
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_values_are_rejected_naming_the_key(key, raw):
    message = rejected(f"{key}:{raw}")
    assert f"option {key!r}" in message, message


# ---- parse_options: ranges ------------------------------------------------------------------

@pytest.mark.parametrize("pair", [
    "max_cache_entries:-1", "max_batch_size:0", "prefill_batch_size:0", "prefill_step_size:0",
    "max_queue:0", "step_timeout:0.5", "step_timeout:-1", "max_tokens:0", "temperature:-0.1",
    "top_p:1.5", "top_p:-0.1", "min_p:1.01", "min_p:-1", "top_k:-1", "repeat_last_n:-1",
    "repetition_penalty:0", "repetition_penalty:-1", "xtc_probability:1.5",
    "xtc_probability:-0.1", "xtc_threshold:0.6", "xtc_threshold:-0.1", "seed:-2",
    f"seed:{2**64}", "cache_bytes:-1", "prompt_cache_disk_bytes:-1", "max_kv_size:0", "context_size:0",
    "context_overflow:drop", "gguf_requant_bits:7", "gguf_requant_bits:1",
    "gguf_requant_group_size:48", "distributed_backend:mpi", "parallel:diagonal",
    "join_timeout:0", "join_timeout:4000", "distributed_step_timeout:0.5",
])
def test_out_of_range_values_are_rejected_naming_the_key(pair):
    key, _, raw = pair.partition(":")
    message = rejected(pair)
    assert message.startswith(f"option {key!r} is out of range: "), message


@pytest.mark.parametrize("pair, key, value", [
    ("max_cache_entries:0", "max_cache_entries", 0), ("step_timeout:0", "step_timeout", 0.0),
    ("step_timeout:1", "step_timeout", 1.0), ("step_timeout:2", "step_timeout", 2.0),
    ("temperature:0", "temperature", 0.0), ("top_p:0", "top_p", 0.0), ("top_p:1", "top_p", 1.0),
    ("min_p:1", "min_p", 1.0), ("repetition_penalty:0.5", "repetition_penalty", 0.5),
    ("xtc_probability:1", "xtc_probability", 1.0), ("xtc_threshold:0.5", "xtc_threshold", 0.5),
    ("xtc_threshold:0", "xtc_threshold", 0.0), ("seed:0", "seed", 0),
    (f"seed:{2**64 - 1}", "seed", 2**64 - 1), ("cache_bytes:0", "cache_bytes", 0),
    ("gguf_requant_bits:8", "gguf_requant_bits", 8),
    ("gguf_requant_group_size:128", "gguf_requant_group_size", 128),
    ("presence_penalty:-2", "presence_penalty", -2.0),
    ("parallel:pipeline", "parallel", "pipeline"),
    ("distributed_backend:jaccl", "distributed_backend", "jaccl"),
    ("hostfile:/etc/hosts.json", "hostfile", "/etc/hosts.json"),
    ("join_timeout:1", "join_timeout", 1.0),
])
def test_boundary_values_are_accepted(pair, key, value):
    assert getattr(parse_options([pair]), key) == value


def test_seed_minus_one_means_random():
    assert parse_options(["seed:-1"]).seed is None
    assert parse_options(["seed:5", "seed:-1"]).seed is None


@pytest.mark.parametrize("pair, hint", [
    ("seed:-2", "-1 for a random seed"), ("xtc_threshold:0.6", "(use 0..0.5)"),
    ("repetition_penalty:0", "1 = off"), ("step_timeout:0.5", "0 = no limit"),
    ("top_p:2", "(use 0..1)"),
])
def test_range_errors_say_what_is_allowed(pair, hint):
    assert hint in rejected(pair)


INT_LIMITS = {
    "max_cache_entries": 2**20, "max_batch_size": 4096, "prefill_batch_size": 4096,
    "prefill_step_size": 2**20, "max_queue": 2**20, "max_tokens": 2**31,
    "repeat_last_n": 2**20, "max_kv_size": 2**31, "context_size": 2**31,
    "cache_bytes": 2**50, "prompt_cache_disk_bytes": 2**50,
}


@pytest.mark.parametrize("key, limit", list(INT_LIMITS.items()))
def test_integer_limits(key, limit):
    assert getattr(parse_options([f"{key}:{limit}"]), key) == limit
    message = rejected(f"{key}:{limit + 1}")
    assert message.startswith(f"option {key!r} is out of range: {limit + 1}"), message


def test_cache_bytes_limit_in_units():
    assert parse_options(["cache_bytes:1024t"]).cache_bytes == 2**50
    assert "'cache_bytes'" in rejected("cache_bytes:1025t")


def test_one_bad_option_fails_the_whole_list():
    assert "'max_queue'" in rejected("top_k:4", "max_queue:0", "seed:3")
