"""mlx_backend/request.py: PredictOptions (and the Score, Embedding, Tokenize
and Detokenize requests) checked and turned into plain requests against a
loaded model, its LoadModel options included."""

import json
import logging
import math

import pytest

import backend_pb2
from mlx_backend import request
from mlx_backend.errors import BackendError, InvalidArgument

M = backend_pb2.Message
P = backend_pb2.PredictOptions
FOX = "The quick brown fox jumps over the lazy dog."  # 10 tokens, no BOS
DEEP = 100_000       # json.loads raises RecursionError on this many levels
MODERATE = 500       # parses, but is far beyond what templates/compilers should see
TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}])


def nested_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def chat_options(**fields):
    fields.setdefault("Messages", [M(role="user", content="hi")])
    return P(UseTokenizerTemplate=True, Tokens=8, **fields)


def assert_invalid(loaded, opts, field):
    with pytest.raises(InvalidArgument) as info:
        request.build_request(opts, loaded)
    assert field in str(info.value), str(info.value)
    return str(info.value)


def build(loaded, **fields):
    fields.setdefault("Prompt", FOX)
    return request.build_request(P(**fields), loaded)


@pytest.fixture(scope="module")
def fox(loaded):
    tokens = loaded.tokenizer.encode(FOX)
    assert len(tokens) == 10
    return tokens


# ---- precedence: request field, else LoadModel option, else default -------------------------

PRECEDENCE = [
    # field, option, request value, option value, built-in default
    ("Temperature", "temperature", 0.75, 0.25, 0.0),
    ("TopP", "top_p", 0.5, 0.25, 1.0),
    ("TopK", "top_k", 7, 3, 0),
    ("MinP", "min_p", 0.5, 0.25, 0.0),
    ("Penalty", "repetition_penalty", 1.5, 1.25, 1.0),
    ("Repeat", "repeat_last_n", 8, 16, 64),
    ("PresencePenalty", "presence_penalty", 0.5, -0.25, 0.0),
    ("FrequencyPenalty", "frequency_penalty", 0.75, 0.5, 0.0),
    ("Seed", "seed", 42, 7, None),
]


@pytest.mark.parametrize("field, option, ask, configured, default", PRECEDENCE,
                         ids=[p[0] for p in PRECEDENCE])
def test_precedence(loaded, configure, field, option, ask, configured, default):
    with_option = configure(loaded, f"{option}:{configured}")
    assert getattr(build(with_option, **{field: ask}).sampling, option) == ask
    assert getattr(build(with_option).sampling, option) == configured
    assert getattr(build(loaded).sampling, option) == default
    assert getattr(build(loaded, **{field: ask}).sampling, option) == ask


def test_penalty_one_and_non_positive_seeds_mean_unset(loaded, configure):
    model = configure(loaded, "repetition_penalty:1.25", "seed:7")
    assert build(model, Penalty=1.0).sampling.repetition_penalty == 1.25
    assert build(model, Seed=-1).sampling.seed == 7
    assert build(model, Seed=0).sampling.seed == 7


def test_xtc_and_logit_bias_come_from_their_own_sources(loaded, configure):
    model = configure(loaded, "xtc_probability:0.5", "xtc_threshold:0.25")
    sampling = build(model, LogitBias='{"3": -2}').sampling
    assert (sampling.xtc_probability, sampling.xtc_threshold) == (0.5, 0.25)
    assert sampling.logit_bias == {3: -2.0}
    assert build(loaded).sampling.logit_bias == {}


@pytest.mark.parametrize("fields, message", [
    (dict(Temperature=-0.5), "Temperature must be >= 0"),
    (dict(Temperature=math.nan), "Temperature must be a finite number"),
    (dict(TopP=1.5), "TopP must be within [0, 1]"),
    (dict(TopP=math.inf), "TopP must be a finite number"),
    (dict(MinP=-0.1), "MinP must be within [0, 1]"),
    (dict(TopK=-1), "TopK must be >= 0"),
    (dict(Repeat=-1), "Repeat must be >= 0"),
    (dict(Penalty=-2), "Penalty must be >= 0"),
    (dict(Penalty=math.nan), "Penalty must be a finite number"),
    (dict(PresencePenalty=math.inf), "PresencePenalty must be a finite number"),
    (dict(FrequencyPenalty=-math.inf), "FrequencyPenalty must be a finite number"),
])
def test_sampling_fields_out_of_range(loaded, fields, message):
    assert message in assert_invalid(loaded, P(Prompt=FOX, **fields), message)


# ---- Tokens and the context -----------------------------------------------------------------

def test_tokens(loaded, configure, fox):
    assert build(loaded, Tokens=5).max_tokens == 5
    assert build(loaded).max_tokens == 512  # the max_tokens option's default
    assert build(configure(loaded, "max_tokens:100")).max_tokens == 100
    small = configure(loaded, context_length=16)
    assert build(small).max_tokens == 6  # capped by the room left in the context
    assert build(small, Tokens=6).max_tokens == 6
    assert "Tokens (max new tokens) must be >= 0" in assert_invalid(
        loaded, P(Prompt=FOX, Tokens=-1), "Tokens")


def test_prompt_and_tokens_must_fit_the_context(loaded, configure):
    small = configure(loaded, context_length=16)
    message = assert_invalid(small, P(Prompt=FOX, Tokens=7), "Tokens")
    assert message == ("prompt (10 tokens) + Tokens (7) exceeds the model's context of 16")
    message = assert_invalid(configure(loaded, context_length=10), P(Prompt=FOX), "prompt")
    assert message.startswith("prompt is 10 tokens, the model's context is 10")
    assert "context_overflow:truncate" in message


def test_truncate_keeps_the_last_tokens_of_a_raw_prompt(loaded, configure, fox):
    model = configure(loaded, "context_overflow:truncate", context_length=16)
    assert build(model, Tokens=6).prompt_tokens == fox
    req = build(model, Tokens=8)
    assert req.prompt_tokens == fox[-8:] and req.max_tokens == 8
    req = build(model)  # Tokens unset: room for at least one new token
    assert req.prompt_tokens == fox and req.max_tokens == 6
    assert build(configure(loaded, "context_overflow:truncate", context_length=5)
                 ).prompt_tokens == fox[-4:]


def test_tokenize_truncates_as_predict_does(loaded, configure, fox):
    model = configure(loaded, "context_overflow:truncate", context_length=16)
    for tokens in (0, 8):
        opts = P(Prompt=FOX, Tokens=tokens)
        assert request.tokenize_request(opts, model) == \
            request.build_request(opts, model).prompt_tokens
    assert request.tokenize_request(P(Prompt=FOX, Tokens=8), model) == fox[-8:]


def test_truncate_drops_the_oldest_turns_of_a_chat(loaded, configure):
    tok = loaded.tokenizer
    messages = [M(role="system", content="Be brief."), M(role="user", content=FOX),
                M(role="assistant", content="Hello world!"),
                M(role="user", content="Paris is the capital of France.")]
    full = request.build_request(chat_options(Messages=messages), loaded).prompt_tokens
    kept = tok.decode(full).replace(
        f"<|im_start|>user\n{FOX}<|im_end|>\n<|im_start|>assistant\nHello world!<|im_end|>\n",
        "")
    model = configure(loaded, "context_overflow:truncate", context_length=len(full) + 7)
    req = request.build_request(chat_options(Messages=messages), model)  # Tokens=8: 1 short
    assert tok.decode(req.prompt_tokens) == kept
    with pytest.raises(InvalidArgument, match="exceeds the model's context"):
        request.build_request(chat_options(Messages=messages),
                              configure(loaded, context_length=len(full) + 7))


def test_a_prompt_that_encodes_to_nothing(loaded):
    assert loaded.tokenizer.encode("\u00e9") == []  # not in the tiny ASCII vocabulary
    assert_invalid(loaded, P(Prompt="\u00e9"), "the prompt encodes to zero tokens")
    assert_invalid(loaded, P(), "empty request")


# ---- logprobs, stop strings and other fields ------------------------------------------------

def test_logprobs(loaded):
    assert (build(loaded).logprobs, build(loaded).top_logprobs) == (False, 0)
    assert (build(loaded, Logprobs=1).logprobs, build(loaded, Logprobs=1).top_logprobs) == (
        True, 0)
    req = build(loaded, TopLogprobs=request.MAX_TOP_LOGPROBS)
    assert req.logprobs and req.top_logprobs == 20
    assert "TopLogprobs must be at most 20, got 21" in assert_invalid(
        loaded, P(Prompt=FOX, TopLogprobs=21), "TopLogprobs")
    for fields in (dict(Logprobs=-1), dict(TopLogprobs=-1)):
        assert_invalid(loaded, P(Prompt=FOX, **fields), "Logprobs and TopLogprobs must be >= 0")


def test_stop_strings(loaded):
    stops = [f"s{i}" for i in range(request.MAX_STOP_STRINGS)]
    assert build(loaded, StopPrompts=stops).stop_strings == stops
    assert build(loaded).stop_strings == []
    assert_invalid(loaded, P(Prompt=FOX, StopPrompts=stops + ["one more"]),
                   "at most 64 stop strings, got 65")


def test_fields_passed_through(loaded):
    req = build(loaded, IgnoreEOS=True, CorrelationId="req-7", Tools=TOOLS)
    assert req.ignore_eos and req.correlation_id == "req-7"
    assert req.tools[0]["function"]["name"] == "get_weather"
    assert not build(loaded).ignore_eos and build(loaded).tools is None


def test_grammar(loaded):
    assert build(loaded, Grammar='root ::= "yes" | "no"').grammar.kind == "gbnf"
    assert build(loaded, Grammar='{"type": "object"}').grammar.kind == "json_schema"
    assert build(loaded, Grammar="  \n").grammar is None
    assert build(loaded).grammar is None
    assert_invalid(loaded, P(Prompt=FOX, Grammar="root ::= missing"), "Grammar is invalid")


def test_unsupported_fields_are_logged(loaded, caplog):
    with caplog.at_level(logging.WARNING, logger="mlx_backend.request"):
        build(loaded, Mirostat=2, TypicalP=0.5, CorrelationId="abc")
    assert "request abc: ignoring fields MLX cannot honour: Mirostat, TypicalP" in caplog.text


# ---- the checkpoint for a chat's preamble ---------------------------------------------------

SYSTEM_CHAT = [M(role="system", content="You are a fox."), M(role="user", content="Hello world!")]


def test_checkpoint_for_a_chat_with_a_system_prompt(loaded):
    req = request.build_request(chat_options(Messages=SYSTEM_CHAT), loaded)
    checkpoint = req.checkpoint_tokens
    assert checkpoint and req.prompt_tokens[:len(checkpoint)] == checkpoint
    assert len(checkpoint) < len(req.prompt_tokens)
    assert loaded.tokenizer.decode(checkpoint) == \
        "<|im_start|>system\nYou are a fox.<|im_end|>\n<|im_start|>user\n"


def test_no_checkpoint(loaded, configure):
    assert request.build_request(chat_options(Messages=SYSTEM_CHAT), configure(
        loaded, "prompt_cache:false")).checkpoint_tokens is None
    assert request.build_request(chat_options(), loaded).checkpoint_tokens is None
    assert build(loaded).checkpoint_tokens is None
    # Messages beside a Prompt: LocalAI rendered the prompt, the template is not used.
    assert build(loaded, Messages=SYSTEM_CHAT).checkpoint_tokens is None


def test_no_checkpoint_when_the_conversation_does_not_start_like_the_probe(loaded):
    # The probe renders system + user; this chat continues with an assistant turn.
    messages = [SYSTEM_CHAT[0], M(role="assistant", content="Hi."),
                M(role="user", content="Hello world!")]
    assert request.build_request(chat_options(Messages=messages),
                                 loaded).checkpoint_tokens is None


# ---- deep JSON in every JSON field ----------------------------------------------------------

def _tool_calls_with_arguments(arguments: str) -> str:
    return json.dumps([{"id": "c1", "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments}}])


DEEP_FIELDS = {
    "LogitBias": lambda d: dict(LogitBias='{"1": ' + nested_array(d) + "}"),
    "Tools": lambda d: dict(Tools=nested_array(d)),
    "Messages[1].tool_calls": lambda d: dict(Messages=[
        M(role="user", content="hi"),
        M(role="assistant", content="", tool_calls=nested_array(d))]),
    "Messages[1].tool_calls[0].function.arguments": lambda d: dict(Messages=[
        M(role="user", content="hi"),
        M(role="assistant", content="", tool_calls=_tool_calls_with_arguments(
            nested_object(d)))]),
    "Metadata.chat_template_kwargs": lambda d: dict(
        Metadata={"chat_template_kwargs": '{"x": ' + nested_array(d) + "}"}),
    "Grammar": lambda d: dict(Grammar='{"type": "object", "x": ' + nested_object(d) + "}"),
}


@pytest.mark.parametrize("depth", [DEEP, MODERATE], ids=["recursion-error", "moderate"])
@pytest.mark.parametrize("field", list(DEEP_FIELDS))
def test_deep_json_is_invalid_argument_naming_the_field(marker_loaded, field, depth):
    message = assert_invalid(marker_loaded, chat_options(**DEEP_FIELDS[field](depth)), field)
    if field == "Grammar":
        assert message.startswith("Grammar is invalid: ")
    assert "nested too deeply" in message


def test_deep_json_in_a_raw_prompt_request(marker_loaded):
    opts = P(Prompt="hi", Tokens=4)
    for fields, field in [(dict(Tools=nested_array(DEEP)), "Tools"),
                          (dict(LogitBias=nested_array(DEEP)), "LogitBias"),
                          (dict(Grammar=nested_array(DEEP)), "Grammar"),
                          (dict(Grammar=nested_object(MODERATE)), "Grammar")]:
        bad = P()
        bad.CopyFrom(opts)
        for name, value in fields.items():
            setattr(bad, name, value)
        assert_invalid(marker_loaded, bad, field)


def test_valid_chat_request_still_builds(marker_loaded):
    req = request.build_request(chat_options(
        Messages=[M(role="user", content="Weather?"),
                  M(role="assistant", content="", tool_calls=_tool_calls_with_arguments(
                      '{"city": "Oslo"}')),
                  M(role="tool", content="sunny", tool_call_id="c1")],
        Tools=TOOLS, LogitBias='{"5": 2.5}',
        Metadata={"chat_template_kwargs": '{"custom": {"nested": [1, 2]}}'}), marker_loaded)
    assert req.tools[0]["function"]["name"] == "get_weather"
    assert req.sampling.logit_bias == {5: 2.5}
    text = marker_loaded.tokenizer.decode(req.prompt_tokens)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text


def test_every_failure_here_is_a_backend_error(marker_loaded):
    """A sweep of hostile values over every JSON field: only BackendErrors."""
    hostile = ["", "[", "{", "]", "null", "0", '""', "[[]]", '{"": {}}', nested_array(DEEP),
               nested_object(MODERATE), '{"a": NaN}', "\u0000",
               '[{"function": null}]', '[{"function": {"name": "f", "arguments": 1}}]']
    for value in hostile:
        for fields in (dict(Tools=value), dict(LogitBias=value), dict(Grammar=value),
                       dict(Metadata={"chat_template_kwargs": value}),
                       dict(Messages=[M(role="user", content="hi"),
                                      M(role="assistant", content="", tool_calls=value)])):
            try:
                request.build_request(chat_options(**fields), marker_loaded)
            except BackendError:
                pass


# ---- LogitBias ------------------------------------------------------------------------------

def test_logit_bias_is_clamped_to_openai_range():
    bias = request._logit_bias('{"1": 1e39, "2": -1e39, "3": 50, "4": -7.5}', 100)
    assert bias == {1: 100.0, 2: -100.0, 3: 50.0, 4: -7.5}
    assert request._logit_bias('{"5": ' + "9" * 400 + "}", 100) == {5: 100.0}
    assert request._logit_bias('{"5": -' + "9" * 400 + "}", 100) == {5: -100.0}
    assert all(type(v) is float for v in request._logit_bias('{"1": 3}', 10).values())


def test_logit_bias_edges():
    assert request._logit_bias("", 10) == {}
    assert request._logit_bias("{}", 10) == {}
    assert request._logit_bias('{"0": 1, "9": -1}', 10) == {0: 1.0, 9: -1.0}
    assert request._logit_bias(json.dumps({str(i): 1 for i in range(10)}), 10) == \
        {i: 1.0 for i in range(10)}


@pytest.mark.parametrize("text, fragment", [
    ('{"1": 1e400}', "finite"),          # parses to inf
    ('{"1": NaN}', "not valid JSON"),
    ('{"1": -Infinity}', "not valid JSON"),
    ('{"1": true}', "finite number"),
    ('{"1": "big"}', "finite number"),
    ('{"1": [1]}', "finite number"),
    ('{"1": null}', "finite number"),
    ('{"x": 1}', "not a token id"),
    ('{"' + "1" * 5000 + '": 1}', "not a token id"),
    ('{"100": 1}', "outside the vocabulary"),
    ('{"-1": 1}', "outside the vocabulary"),
    ("[1]", "must be a JSON object"),
    (json.dumps({str(i): 1 for i in range(101)}), "more than the vocabulary"),
])
def test_bad_logit_bias_is_invalid_argument(text, fragment):
    with pytest.raises(InvalidArgument) as info:
        request._logit_bias(text, 100)
    message = str(info.value)
    assert "LogitBias" in message and fragment in message, message
    assert len(message) < 300


def test_logit_bias_through_build_request(marker_loaded):
    req = request.build_request(P(Prompt="hi", Tokens=4, LogitBias='{"5": 1e39}'), marker_loaded)
    assert req.sampling.logit_bias == {5: 100.0}
    assert_invalid(marker_loaded, P(
        Prompt="hi", Tokens=4, LogitBias=json.dumps({str(i): 1 for i in range(
            len(marker_loaded.tokenizer) + 1)})), "LogitBias")
    last = len(marker_loaded.tokenizer) - 1  # an added marker token is in the vocabulary
    assert request.build_request(P(Prompt="hi", LogitBias=f'{{"{last}": 1}}'),
                                 marker_loaded).sampling.logit_bias == {last: 1.0}
    assert_invalid(marker_loaded, P(Prompt="hi", LogitBias=f'{{"{last + 1}": 1}}'),
                   "outside the vocabulary")


# ---- attention_window -----------------------------------------------------------------------

def test_attention_window(loaded, configure):
    assert request.attention_window(loaded) == loaded.context_length == 2048
    assert request.attention_window(configure(loaded, "max_kv_size:16")) == 16
    assert request.attention_window(configure(loaded, "max_kv_size:4096")) == 2048
    assert request.attention_window(configure(loaded, context_length=100)) == 100


# ---- score_request --------------------------------------------------------------------------

def score(prompt, candidates, include=False):
    return backend_pb2.ScoreRequest(prompt=prompt, candidates=candidates,
                                    include_token_logprobs=include)


def test_score_candidates_continue_the_prompt(loaded, fox):
    req = request.score_request(score("The quick brown", [" fox", " fox jumps"], True), loaded)
    assert req.prompt_tokens == fox[:3]
    assert req.candidates == [fox[3:4], fox[3:5]]
    assert req.include_token_logprobs is True
    assert request.score_request(score("The", [" quick"]), loaded).include_token_logprobs \
        is False


def test_a_candidate_that_would_retokenize_the_prompt_is_encoded_alone(loaded):
    tok = loaded.tokenizer
    prompt, candidate = "The quick bro", "wn fox"
    joint = tok.encode(prompt + candidate)
    assert joint[:len(tok.encode(prompt))] != tok.encode(prompt)  # the premise
    req = request.score_request(score(prompt, [candidate]), loaded)
    assert req.candidates == [tok.encode(candidate, add_special_tokens=False)]


@pytest.mark.parametrize("prompt, candidates, message", [
    ("The", [], "Score needs at least one candidate"),
    ("The", [" fox", ""], r"candidates\[1\] is empty"),
    ("", [" fox"], "Score needs a prompt"),
    ("\u00e9", [" fox"], "Score needs a prompt"),
    ("The", [" fox"] * 257, "at most 256 candidates, got 257"),
])
def test_bad_score_requests(loaded, prompt, candidates, message):
    with pytest.raises(InvalidArgument, match=message):
        request.score_request(score(prompt, candidates), loaded)


def test_score_at_most_256_candidates(loaded):
    assert len(request.score_request(score("The", [" fox"] * 256), loaded).candidates) == 256


def test_score_must_fit_the_attention_window(loaded, configure):
    model = configure(loaded, "max_kv_size:4")
    assert request.score_request(score("The quick", [" brown fox"]), model)
    with pytest.raises(InvalidArgument,
                       match="prompt \\+ candidate is 5 tokens, more than the 4"):
        request.score_request(score("The quick", [" fox", " brown fox jumps"]), model)


def test_score_total_candidate_tokens_are_limited(loaded, monkeypatch):
    monkeypatch.setattr(request, "MAX_SCORE_TOKENS", 3)
    assert request.score_request(score("The quick brown", [" fox", " fox jumps"]), loaded)
    with pytest.raises(InvalidArgument, match="the candidates are 4 tokens together, at most 3"):
        request.score_request(score("The quick brown", [" fox", " fox jumps", " dog"]), loaded)


# ---- embedding_request, detokenize_request, tokenize_request --------------------------------

def test_embedding_tokens(loaded, fox):
    assert request.embedding_request(P(EmbeddingTokens=[5, 6, 7], Embeddings="x"),
                                     loaded) == [5, 6, 7]
    assert request.embedding_request(P(Embeddings=FOX, Prompt="Hello"), loaded) == fox
    assert request.embedding_request(P(Prompt=FOX), loaded) == fox


@pytest.mark.parametrize("fields, message", [
    (dict(), "Embedding needs Embeddings, Prompt or EmbeddingTokens"),
    (dict(Embeddings="\u00e9"), "Embedding needs"),
    (dict(EmbeddingTokens=[1, -1]), r"EmbeddingTokens: token ids outside the vocabulary "
                                    r"\(0\.\.279\): \[-1\]"),
    (dict(EmbeddingTokens=[280]), r"EmbeddingTokens: token ids outside"),
])
def test_bad_embedding_requests(loaded, fields, message):
    assert len(loaded.tokenizer) == 280
    with pytest.raises(InvalidArgument, match=message):
        request.embedding_request(P(**fields), loaded)


def test_embedding_must_fit_the_attention_window(loaded, configure):
    model = configure(loaded, "max_kv_size:3")
    assert request.embedding_request(P(EmbeddingTokens=[1, 2, 3]), model) == [1, 2, 3]
    with pytest.raises(InvalidArgument, match="the input is 10 tokens, more than the 3"):
        request.embedding_request(P(Prompt=FOX), model)


def test_detokenize_request(loaded):
    D = backend_pb2.DetokenizeRequest
    assert request.detokenize_request(D(tokens=[159, 272]), loaded) == [159, 272]
    assert request.detokenize_request(D(tokens=[0, 279]), loaded) == [0, 279]
    assert request.detokenize_request(D(), loaded) == []
    for bad in ([280], [-5, 3], [2**31 - 1]):
        with pytest.raises(InvalidArgument, match=r"^tokens: token ids outside the vocab"):
            request.detokenize_request(D(tokens=bad), loaded)


def test_tokenize_request_gives_what_predict_would_feed(loaded, fox):
    assert request.tokenize_request(P(Prompt=FOX), loaded) == fox
    opts = chat_options(Messages=SYSTEM_CHAT)
    assert request.tokenize_request(opts, loaded) == \
        request.build_request(opts, loaded).prompt_tokens
    with pytest.raises(InvalidArgument, match="empty request"):
        request.tokenize_request(P(), loaded)


# ---- load_request ---------------------------------------------------------------------------

def test_load_request_carries_the_model_options():
    req = request.load_request(backend_pb2.ModelOptions(
        Model="m", ModelFile="/models/m", ModelPath="/models", Options=["top_k:3"],
        ContextSize=1024, MaxModelLen=4096, DraftModel="d", CacheTypeKey="q8_0",
        CacheTypeValue="f16"))
    assert req == request.LoadRequest(
        model="m", model_file="/models/m", model_path="/models", options=["top_k:3"],
        context_size=1024, draft_model="d", cache_type_key="q8_0", cache_type_value="f16")
    assert request.load_request(backend_pb2.ModelOptions(Model="m", MaxModelLen=4096)
                                ).context_size == 4096


@pytest.mark.parametrize("fields, adapters, scales", [
    (dict(), [], []),
    (dict(LoraAdapter="a"), ["a"], [1.0]),
    (dict(LoraAdapter="a", LoraScale=0.5), ["a"], [0.5]),
    (dict(LoraScale=0.5), [], []),  # a scale without an adapter means nothing
    (dict(LoraAdapters=["a", "b"]), ["a", "b"], [1.0, 1.0]),
    (dict(LoraAdapters=["a", "b"], LoraScales=[0.25]), ["a", "b"], [0.25, 1.0]),
    (dict(LoraAdapters=["a"], LoraScales=[0.75], LoraAdapter="x", LoraScale=0.5),
     ["a"], [0.75]),  # the lists win over the single adapter
])
def test_load_request_lora_adapters_and_scales(fields, adapters, scales):
    req = request.load_request(backend_pb2.ModelOptions(Model="m", **fields))
    assert (req.lora_adapters, req.lora_scales) == (adapters, scales)


def test_the_single_adapters_scale_does_not_go_to_the_listed_adapters():
    req = request.load_request(backend_pb2.ModelOptions(
        Model="m", LoraAdapters=["a"], LoraAdapter="x", LoraScale=0.5))
    assert (req.lora_adapters, req.lora_scales) == (["a"], [1.0])


@pytest.mark.parametrize("fields, message", [
    (dict(LoraAdapters=["a"], LoraScales=[0.5, 0.5]), "2 LoRA scales for 1 adapters"),
    (dict(LoraScales=[0.5]), "1 LoRA scales for 0 adapters"),
    (dict(LoraAdapters=["a"], LoraScales=[math.inf]), "LoraScale must be a finite number"),
    (dict(LoraAdapter="a", LoraScale=math.nan), "LoraScale must be a finite number"),
])
def test_bad_load_requests(fields, message):
    with pytest.raises(InvalidArgument, match=message):
        request.load_request(backend_pb2.ModelOptions(Model="m", **fields))
