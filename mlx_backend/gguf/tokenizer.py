"""Build a Hugging Face `tokenizers` tokenizer from GGUF vocabulary metadata.

GGUF files carry the vocabulary (tokens, token types, scores, merges) and the
name of llama.cpp's pre-tokenizer instead of a tokenizer.json.  We rebuild an
equivalent tokenizer.json so `transformers` / mlx-lm can load it, choosing the
same splitting rules llama.cpp uses so token ids agree with llama.cpp.

Supported vocabularies:
- ``gpt2``  (byte-level BPE): the pre-tokenizer regexes are those of
  llama.cpp's ``llm_tokenizer_bpe`` for the ``tokenizer.ggml.pre`` name.
- ``llama`` (SentencePiece BPE with scores and ``<0xNN>`` byte fallback):
  merges are derived from the scores, as transformers does for SentencePiece.

``architecture.plan_import`` calls ``build_tokenizer_files`` and reports a
``TokenizerBuildError`` as ``GGUFImportError`` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
from tokenizers import normalizers, pre_tokenizers, processors

# llama.cpp token types (llama_token_type / gguf.TokenType).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

_GPT2 = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
)
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (
    r"[\p{P}\$\+<=>\^~\|]+",
    _GPT2,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)

# Pre-tokenizer name -> (regexes applied in turn, ignore_merges, add_bos default,
# clean_up_tokenization_spaces), mirroring llama.cpp's vocabulary code.
_PRE_TOKENIZERS: Dict[str, tuple] = {}


def _register(names: Sequence[str], regexes, ignore_merges=False, add_bos=False,
              clean_spaces=True):
    for name in names:
        _PRE_TOKENIZERS[name] = (tuple(regexes), ignore_merges, add_bos, clean_spaces)


_register(["default"], _DEFAULT)
_register(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"],
          [_LLAMA3], ignore_merges=True, add_bos=True)
_register(["qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"], [_QWEN2], clean_spaces=False)
_register(["gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "exaone4"], [_GPT2])
_register(["starcoder", "refact", "codeshell", "exaone", "minerva-7b"], [r"\p{N}", _GPT2])
_register(["smollm", "command-r"], [r"\p{N}", _GPT2], clean_spaces=False)
_register(["falcon"], [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"])
_register(["deepseek-coder"],
          [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
          clean_spaces=False)

SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))


class TokenizerBuildError(ValueError):
    """The GGUF vocabulary cannot be turned into a tokenizer (message says why)."""


@dataclass
class TokenizerFiles:
    """What the importer writes: tokenizer.json text plus tokenizer_config.json."""

    tokenizer_json: str
    tokenizer_config: dict
    bos_token_id: Optional[int]
    eos_token_ids: List[int] = field(default_factory=list)


def build_tokenizer_files(meta: dict) -> TokenizerFiles:
    """Rebuild tokenizer.json / tokenizer_config.json from GGUF metadata."""
    vocab = _Vocab.from_metadata(meta)
    kind = meta.get("tokenizer.ggml.model")
    builders = {"gpt2": _build_bpe, "llama": _build_spm}
    if kind is None:
        raise TokenizerBuildError("missing required metadata key 'tokenizer.ggml.model'")
    if kind not in builders:
        raise TokenizerBuildError(
            f"unsupported tokenizer model tokenizer.ggml.model={kind!r} "
            "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
        )
    try:
        tok, settings = builders[kind](vocab, meta)
    except TokenizerBuildError:
        raise
    except Exception as err:  # the tokenizers library raises bare Exceptions
        raise TokenizerBuildError(f"invalid {kind} vocabulary: {err}") from err
    settings["add_bos"] = _flag(meta, "tokenizer.ggml.add_bos_token", settings["add_bos_default"])
    settings["add_eos"] = _flag(meta, "tokenizer.ggml.add_eos_token", False)
    _add_special_tokens(tok, vocab)
    _set_post_processor(tok, vocab, settings)
    return TokenizerFiles(
        tokenizer_json=tok.to_str(),
        tokenizer_config=_tokenizer_config(vocab, meta, settings),
        bos_token_id=vocab.special_id("bos"),
        eos_token_ids=vocab.eos_ids(),
    )


@dataclass
class _Vocab:
    """The GGUF vocabulary arrays plus the special-token ids."""

    tokens: List[str]
    types: List[int]
    scores: Optional[List[float]]
    merges: Optional[List[str]]
    specials: Dict[str, int]

    @classmethod
    def from_metadata(cls, meta: dict) -> "_Vocab":
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerBuildError("missing required metadata key 'tokenizer.ggml.tokens'")
        tokens = [str(t) for t in tokens]
        types = _as_list(meta.get("tokenizer.ggml.token_type"), TOKEN_NORMAL, len(tokens))
        scores = meta.get("tokenizer.ggml.scores")
        scores = None if scores is None else [float(s) for s in scores]
        if scores is not None and len(scores) != len(tokens):
            raise TokenizerBuildError("tokenizer.ggml.scores and tokenizer.ggml.tokens differ in length")
        merges = meta.get("tokenizer.ggml.merges")
        specials = {}
        for name in ("bos", "eos", "unknown", "padding", "eot", "eom", "sep", "cls", "mask"):
            value = meta.get(f"tokenizer.ggml.{name}_token_id")
            if value is not None and 0 <= int(value) < len(tokens):
                specials[name] = int(value)
        return cls(tokens, [int(t) for t in types], scores,
                   None if merges is None else [str(m) for m in merges], specials)

    def special_id(self, name: str) -> Optional[int]:
        return self.specials.get(name)

    def special_text(self, name: str) -> Optional[str]:
        idx = self.specials.get(name)
        return None if idx is None else self.tokens[idx]

    def eos_ids(self) -> List[int]:
        """EOS first, then end-of-turn / end-of-message ids llama.cpp also stops on."""
        ids = []
        for name in ("eos", "eot", "eom"):
            idx = self.specials.get(name)
            if idx is not None and idx not in ids:
                ids.append(idx)
        return ids

    def token_to_id(self) -> Dict[str, int]:
        """Later duplicates win, as in llama.cpp's token_to_id map."""
        return {tok: i for i, tok in enumerate(self.tokens)}


def _as_list(values, default, n) -> list:
    if values is None:
        return [default] * n
    values = list(values)
    if len(values) != n:
        raise TokenizerBuildError("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    return values


def _pre_tokenizer_settings(meta: dict) -> tuple:
    name = meta.get("tokenizer.ggml.pre") or "default"
    settings = _PRE_TOKENIZERS.get(str(name))
    if settings is None:
        raise TokenizerBuildError(
            f"unsupported pre-tokenizer tokenizer.ggml.pre={name!r} "
            f"(supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)})"
        )
    return settings


def _parse_merges(merges: Sequence[str]) -> List[tuple]:
    """Split 'a b' at the first space after the first character, like llama.cpp."""
    pairs = []
    for merge in merges:
        pos = merge.find(" ", 1)
        if pos < 0:
            raise TokenizerBuildError(f"malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((merge[:pos], merge[pos + 1:]))
    return pairs


def _build_bpe(vocab: _Vocab, meta: dict):
    """Byte-level BPE: regex splits, byte-to-unicode mapping, ranked merges."""
    if vocab.merges is None:
        raise TokenizerBuildError("missing required metadata key 'tokenizer.ggml.merges'")
    regexes, ignore_merges, add_bos_default, clean_spaces = _pre_tokenizer_settings(meta)
    model = models.BPE(
        vocab=vocab.token_to_id(),
        merges=_parse_merges(vocab.merges),
        ignore_merges=ignore_merges,
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                           use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok, {"add_bos_default": add_bos_default, "clean_spaces": clean_spaces,
                 "add_space_prefix": False}


def _build_spm(vocab: _Vocab, meta: dict):
    """SentencePiece BPE: '▁' for spaces, score-ranked merges, <0xNN> byte fallback."""
    if vocab.scores is None:
        raise TokenizerBuildError("missing required metadata key 'tokenizer.ggml.scores'")
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    unk = vocab.special_text("unknown")
    model = models.BPE(
        vocab=vocab.token_to_id(),
        merges=_spm_merges(vocab),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    # A normalizer runs on each piece between added tokens, so '▁' is prepended
    # after every special token too, as llama.cpp does for SPM vocabularies.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok, {"add_bos_default": True, "clean_spaces": False,
                 "add_space_prefix": add_space_prefix}


def _spm_merges(vocab: _Vocab) -> List[tuple]:
    """Merges ranked by the merged piece's score (llama.cpp merges best score first)."""
    ids = vocab.token_to_id()
    mergeable = {TOKEN_NORMAL, TOKEN_USER_DEFINED}
    found = []
    for idx, (piece, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind not in mergeable or len(piece) < 2 or ids.get(piece) != idx:
            continue
        local = [
            (piece[:i], piece[i:]) for i in range(1, len(piece))
            if piece[:i] in ids and piece[i:] in ids
        ]
        local.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        found.extend((vocab.scores[idx], pair) for pair in local)
    found.sort(key=lambda item: -item[0])  # stable: ties keep vocabulary order
    return [pair for _, pair in found]


def _add_special_tokens(tok: Tokenizer, vocab: _Vocab) -> None:
    """Control/unknown tokens become special added tokens; user-defined ones plain.

    llama.cpp matches user-defined tokens in any text and prints them when
    decoding, which is what a non-special added token does here; control tokens
    are hidden by skip_special_tokens like llama.cpp hides them.
    """
    seen = set()
    added = []
    for text, kind in zip(vocab.tokens, vocab.types):
        special = kind in (TOKEN_CONTROL, TOKEN_UNKNOWN)
        if not (special or kind == TOKEN_USER_DEFINED) or not text or text in seen:
            continue
        seen.add(text)
        added.append(AddedToken(text, special=special, normalized=False,
                                lstrip=False, rstrip=False, single_word=False))
    if added:
        tok.add_tokens(added)


def _flag(meta: dict, key: str, default: bool) -> bool:
    value = meta.get(key)
    return default if value is None else bool(value)


def _set_post_processor(tok: Tokenizer, vocab: _Vocab, settings: dict) -> None:
    """Prepend BOS / append EOS when the GGUF asks for it."""
    bos = vocab.special_text("bos") if settings["add_bos"] else None
    eos = vocab.special_text("eos") if settings["add_eos"] else None
    if bos is None and eos is None:
        return
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    special = {}
    if bos is not None:
        special[bos] = vocab.special_id("bos")
    if eos is not None:
        special[eos] = vocab.special_id("eos")
    tok.post_processor = processors.TemplateProcessing(
        single=head + ["$A"] + tail,
        pair=head + ["$A"] + tail + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail],
        special_tokens=list(special.items()),
    )


def _tokenizer_config(vocab: _Vocab, meta: dict, settings: dict) -> dict:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": settings["add_bos"],
        "add_eos_token": settings["add_eos"],
        "clean_up_tokenization_spaces": settings["clean_spaces"],
        "model_input_names": ["input_ids", "attention_mask"],
    }
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"),
                      ("unk_token", "unknown"), ("pad_token", "padding")):
        text = vocab.special_text(name)
        if text is not None:
            config[key] = text
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    if context:
        config["model_max_length"] = int(context)
    return config

