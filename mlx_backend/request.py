"""A generation request as plain data, built and validated from PredictOptions.

Precedence for every sampling control: the request's field when set, else the
LoadModel option, else the built-in default. In proto3 a zero means "not set",
so Temperature 0 falls back to the model's `temperature` option, whose own
default is 0 (greedy).
"""

import dataclasses
import logging
import math
from typing import List, Optional, Sequence

from . import chat
from .errors import InvalidArgument
from .options import ModelSettings
from .sampling import SamplingParams
from .tool_choice import ToolChoice, parse_tool_choice

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 64

# PredictOptions fields MLX cannot honour: logged when a request sets them.
_UNSUPPORTED = ("Mirostat", "MirostatETA", "MirostatTAU", "TailFreeSamplingZ", "TypicalP",
                "NegativePrompt", "NegativePromptScale", "RopeFreqBase",
                "RopeFreqScale", "PenalizeNL", "Images", "Videos", "Audios")


@dataclasses.dataclass
class GenerationRequest:
    prompt_tokens: List[int]
    max_tokens: int
    sampling: SamplingParams
    stop_strings: List[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: Optional[object] = None  # a compiled grammar.GrammarSpec
    tools: Optional[list] = None  # OpenAI tool definitions, for tool-call parsing
    checkpoint_tokens: Optional[List[int]] = None  # a prefix worth caching on its own
    n_draft: int = 0  # NDraft: draft tokens per step; 0 = the option, < 0 = no drafting
    cache_path: str = ""  # a folder of saved prompt caches (PromptCachePath)
    cache_read_only: bool = False  # PromptCacheRO: use saved caches, write none
    cache_all: bool = False  # PromptCacheAll: also save finished turns
    correlation_id: str = ""


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return value


def _pick(request_value, default):
    return request_value if request_value else default


# OpenAI's range for logit_bias. Anything beyond it already bans or forces a
# token, and a bias of 1e39 would overflow float32 (and far less, 65504, a
# float16 model's logits) into inf/NaN.
LOGIT_BIAS_LIMIT = 100.0


def _logit_bias(text: str, vocab_size: int) -> dict:
    """`LogitBias`: a JSON object {token id: bias}.

    Keys must be token ids in the vocabulary, values finite numbers (not
    booleans); a bias outside [-100, 100] (OpenAI's range) is clamped into
    it. At most one entry per vocabulary token.
    """
    if not text:
        return {}
    raw = chat.parse_json(text, "LogitBias", dict)
    if len(raw) > vocab_size:
        raise InvalidArgument(f"LogitBias has {len(raw)} entries, more than the "
                              f"vocabulary's {vocab_size} tokens")
    bias = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidArgument(f"LogitBias key {key[:50]!r} is not a token id") from None
        if not 0 <= token < vocab_size:
            raise InvalidArgument(f"LogitBias token id {key[:50]} is outside the vocabulary "
                                  f"(0..{vocab_size - 1})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, float) and not math.isfinite(value)):
            raise InvalidArgument(f"LogitBias value for token {token} must be a finite number")
        # Clamp before converting: a huge int (10**400) does not fit a float.
        bias[token] = float(min(max(value, -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT))
    return bias


def sampling_params(opts, settings: ModelSettings, vocab_size: int) -> SamplingParams:
    temperature = _finite("Temperature", opts.Temperature)
    top_p = _finite("TopP", opts.TopP)
    min_p = _finite("MinP", opts.MinP)
    if temperature < 0:
        raise InvalidArgument(f"Temperature must be >= 0, got {temperature}")
    if not 0 <= top_p <= 1:
        raise InvalidArgument(f"TopP must be within [0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise InvalidArgument(f"MinP must be within [0, 1], got {min_p}")
    if opts.TopK < 0:
        raise InvalidArgument(f"TopK must be >= 0, got {opts.TopK}")
    if opts.Repeat < 0:
        raise InvalidArgument(f"Repeat must be >= 0, got {opts.Repeat}")
    penalty = _finite("Penalty", opts.Penalty)
    if penalty < 0:
        raise InvalidArgument(f"Penalty must be >= 0 (1 = off), got {penalty}")
    return SamplingParams(
        temperature=_pick(temperature, settings.temperature),
        top_p=_pick(top_p, settings.top_p),
        top_k=_pick(opts.TopK, settings.top_k),
        min_p=_pick(min_p, settings.min_p),
        repetition_penalty=penalty if penalty not in (0, 1) else settings.repetition_penalty,
        repeat_last_n=_pick(opts.Repeat, settings.repeat_last_n),
        presence_penalty=_pick(_finite("PresencePenalty", opts.PresencePenalty),
                               settings.presence_penalty),
        frequency_penalty=_pick(_finite("FrequencyPenalty", opts.FrequencyPenalty),
                                settings.frequency_penalty),
        logit_bias=_logit_bias(opts.LogitBias, vocab_size),
        xtc_probability=settings.xtc_probability,
        xtc_threshold=settings.xtc_threshold,
        seed=opts.Seed if opts.Seed > 0 else settings.seed,
    )


def _grammar(text: str, tokenizer):
    if not text.strip():
        return None
    from .grammar import compile_grammar  # llguidance loads only when a grammar is used

    return compile_grammar(text, tokenizer)


def _constraint(opts, choice: ToolChoice, prompt, tokens, tokenizer):
    """The request's grammar: the user's Grammar, or the one enforcing ToolChoice."""
    if not choice.constrains:
        return _grammar(opts.Grammar, tokenizer)
    from .tool_choice import tool_choice_grammar

    return tool_choice_grammar(choice, prompt.tools, tokenizer, tokens,
                               user_grammar=opts.Grammar, template_kwargs=prompt.kwargs)


def _log_ignored(opts):
    ignored = [name for name in _UNSUPPORTED if getattr(opts, name)]
    if ignored:
        log.warning("request %s: ignoring fields MLX cannot honour: %s",
                    opts.CorrelationId or "-", ", ".join(ignored))


def build_request(opts, loaded) -> GenerationRequest:
    """Validate a PredictOptions and turn it into a GenerationRequest for
    the model it was tokenized with (its LoadModel options included)."""
    tokenizer = loaded.tokenizer
    settings = loaded.settings
    if opts.Tokens < 0:
        raise InvalidArgument(f"Tokens (max new tokens) must be >= 0, got {opts.Tokens}")
    if opts.Logprobs < 0 or opts.TopLogprobs < 0:
        raise InvalidArgument("Logprobs and TopLogprobs must be >= 0")
    if opts.TopLogprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"TopLogprobs must be at most {MAX_TOP_LOGPROBS}, "
                              f"got {opts.TopLogprobs}")
    if len(opts.StopPrompts) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, "
                              f"got {len(opts.StopPrompts)}")
    sampling = sampling_params(opts, settings, len(tokenizer))
    choice = parse_tool_choice(opts.ToolChoice)
    context = loaded.context_length
    prompt = chat.parse_prompt(opts)
    tokens = chat.prompt_tokens(tokenizer, prompt, _truncation_budget(opts, loaded))
    if not tokens:
        raise InvalidArgument("the prompt encodes to zero tokens")
    if len(tokens) >= context:
        raise InvalidArgument(f"prompt is {len(tokens)} tokens, the model's context is "
                              f"{context}: shorten the prompt (or load with "
                              f"context_overflow:truncate)")
    room = context - len(tokens)
    if opts.Tokens > room:
        raise InvalidArgument(f"prompt ({len(tokens)} tokens) + Tokens ({opts.Tokens}) "
                              f"exceeds the model's context of {context}")
    _log_ignored(opts)
    checkpoint = None
    if settings.prompt_cache and chat.uses_template(opts):
        checkpoint = chat.system_prefix_tokens(tokenizer, prompt)
        if checkpoint is not None and tokens[:len(checkpoint)] != checkpoint:
            checkpoint = None  # the template renders the system turn differently in context
    return GenerationRequest(
        prompt_tokens=tokens,
        max_tokens=opts.Tokens or min(settings.max_tokens, room),
        sampling=sampling,
        stop_strings=list(opts.StopPrompts),
        ignore_eos=opts.IgnoreEOS,
        logprobs=opts.Logprobs > 0 or opts.TopLogprobs > 0,
        top_logprobs=opts.TopLogprobs,
        grammar=_constraint(opts, choice, prompt, tokens, tokenizer),
        tools=prompt.tools,
        checkpoint_tokens=checkpoint,
        n_draft=max(min(opts.NDraft, 64), -1),
        cache_path=opts.PromptCachePath or settings.prompt_cache_path or "",
        cache_read_only=opts.PromptCacheRO,
        cache_all=opts.PromptCacheAll,
        correlation_id=opts.CorrelationId,
    )


# ---- the other RPCs: each request checked here, the servicer only translates ----

MAX_SCORE_CANDIDATES = 256
MAX_SCORE_TOKENS = 65536  # all candidates together: Score runs between decode steps


def attention_window(loaded) -> int:
    """Most tokens one forward pass may hold: the context, or the rotating
    KV window when `max_kv_size` is smaller."""
    limit = loaded.settings.max_kv_size
    return min(loaded.context_length, limit) if limit else loaded.context_length


def _check_token_ids(tokens: Sequence[int], vocab_size: int, field: str) -> List[int]:
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument(f"{field}: token ids outside the vocabulary "
                              f"(0..{vocab_size - 1}): {bad[:10]}")
    return list(tokens)


def _check_fits(length: int, loaded, what: str):
    window = attention_window(loaded)
    if length > window:
        raise InvalidArgument(f"{what} is {length} tokens, more than the {window} the model "
                              f"can attend to (context / max_kv_size)")


def _truncation_budget(opts, loaded) -> Optional[int]:
    """How many prompt tokens fit with `context_overflow:truncate` (None: no cut)."""
    if loaded.settings.context_overflow != "truncate":
        return None
    return loaded.context_length - max(opts.Tokens, 1)


def tokenize_request(opts, loaded) -> List[int]:
    """TokenizeString: the tokens a Predict with the same fields would feed
    (cut the same way under `context_overflow:truncate`)."""
    return chat.prompt_tokens(loaded.tokenizer, chat.parse_prompt(opts),
                              _truncation_budget(opts, loaded))


def detokenize_request(request, loaded) -> List[int]:
    return _check_token_ids(request.tokens, len(loaded.tokenizer), "tokens")


@dataclasses.dataclass
class ScoreRequest:
    prompt_tokens: List[int]
    candidates: List[List[int]]  # each candidate's tokens as they follow the prompt
    include_token_logprobs: bool


def _continuation(tokenizer, prompt_text, prompt, candidate, index):
    """Tokens of `candidate` as they follow the prompt (joint tokenization when
    it extends the prompt's tokens, else the candidate on its own)."""
    if not candidate:
        raise InvalidArgument(f"candidates[{index}] is empty")
    joint = tokenizer.encode(prompt_text + candidate)
    if joint[:len(prompt)] == prompt and len(joint) > len(prompt):
        return joint[len(prompt):]
    return tokenizer.encode(candidate, add_special_tokens=False)


def score_request(request, loaded) -> ScoreRequest:
    tokenizer = loaded.tokenizer
    if not request.candidates:
        raise InvalidArgument("Score needs at least one candidate")
    if len(request.candidates) > MAX_SCORE_CANDIDATES:
        raise InvalidArgument(f"Score takes at most {MAX_SCORE_CANDIDATES} candidates, "
                              f"got {len(request.candidates)}: split the request")
    prompt = tokenizer.encode(request.prompt)
    if not prompt:
        raise InvalidArgument("Score needs a prompt that encodes to at least one token")
    candidates = [_continuation(tokenizer, request.prompt, prompt, c, i)
                  for i, c in enumerate(request.candidates)]
    _check_fits(len(prompt) + max(len(c) for c in candidates), loaded, "prompt + candidate")
    total = sum(len(c) for c in candidates)
    if total > MAX_SCORE_TOKENS:
        raise InvalidArgument(f"the candidates are {total} tokens together, at most "
                              f"{MAX_SCORE_TOKENS} per Score call: split the request")
    return ScoreRequest(prompt, candidates, request.include_token_logprobs)


def embedding_request(opts, loaded) -> List[int]:
    """The tokens to embed: EmbeddingTokens, else Embeddings (or Prompt) encoded."""
    text = opts.Embeddings or opts.Prompt
    if opts.EmbeddingTokens:
        tokens = _check_token_ids(opts.EmbeddingTokens, len(loaded.tokenizer),
                                  "EmbeddingTokens")
    else:
        tokens = loaded.tokenizer.encode(text) if text else []
    if not tokens:
        raise InvalidArgument("Embedding needs Embeddings, Prompt or EmbeddingTokens")
    _check_fits(len(tokens), loaded, "the input")
    return tokens


@dataclasses.dataclass
class LoadRequest:
    """What LoadModel asks for, as plain data (options still as "key:value")."""

    model: str
    model_file: str = ""
    model_path: str = ""
    options: List[str] = dataclasses.field(default_factory=list)
    context_size: int = 0
    lora_adapters: List[str] = dataclasses.field(default_factory=list)
    lora_scales: List[float] = dataclasses.field(default_factory=list)
    draft_model: str = ""
    cache_type_key: str = ""
    cache_type_value: str = ""


def load_request(opts) -> LoadRequest:
    """ModelOptions to a LoadRequest. `LoraAdapter`/`LoraScale` (one adapter)
    and `LoraAdapters`/`LoraScales` (several) mean the same thing, as in
    LocalAI's llama.cpp backend; a missing scale is 1."""
    adapters = list(opts.LoraAdapters) or ([opts.LoraAdapter] if opts.LoraAdapter else [])
    single = not opts.LoraAdapters and opts.LoraAdapter and opts.LoraScale
    scales = list(opts.LoraScales) or ([opts.LoraScale] if single else [])
    if len(scales) > len(adapters):
        raise InvalidArgument(f"{len(scales)} LoRA scales for {len(adapters)} adapters")
    scales += [1.0] * (len(adapters) - len(scales))
    for scale in scales:
        _finite("LoraScale", scale)
    return LoadRequest(
        model=opts.Model, model_file=opts.ModelFile, model_path=opts.ModelPath,
        options=list(opts.Options), context_size=opts.ContextSize or opts.MaxModelLen,
        lora_adapters=adapters, lora_scales=scales, draft_model=opts.DraftModel,
        cache_type_key=opts.CacheTypeKey, cache_type_value=opts.CacheTypeValue)
