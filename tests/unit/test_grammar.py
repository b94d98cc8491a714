"""mlx_backend/grammar.py, the part a hostile request reaches: the Grammar
field is a JSON schema or GBNF, and deep JSON is rejected before any compiler
recurses on it. (Decoding under a grammar: tests/test_grammar.py.)"""

import json

import pytest

from mlx_backend.errors import InvalidArgument
from mlx_backend.grammar import compile_grammar

DEEP = 100_000       # json.loads raises RecursionError on this many levels
MODERATE = 500       # parses, but is far beyond what templates/compilers should see


def nested_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def test_grammar_deep_json_is_invalid_but_gbnf_and_schemas_still_compile(tok):
    for text in (nested_array(DEEP), nested_object(DEEP), nested_object(MODERATE)):
        with pytest.raises(InvalidArgument) as info:
            compile_grammar(text, tok)
        assert str(info.value).startswith("Grammar is invalid: ")
    schema = {"type": "string"}
    for _ in range(30):  # 31 levels of JSON: within the limit
        schema = {"type": "array", "items": schema}
    assert compile_grammar(json.dumps(schema), tok).kind == "json_schema"
    assert compile_grammar('root ::= "yes" | "no"', tok).kind == "gbnf"
    with pytest.raises(InvalidArgument, match="^Grammar is invalid: "):
        compile_grammar("[1, 2]", tok)  # JSON but not a schema: tried as GBNF
