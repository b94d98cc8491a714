"""Builds a tiny random-weight llama model folder that mlx-lm can load.

Tests use it for mechanics (batching, caching, sampling, errors): it loads in
well under a second and decodes hundreds of tokens per second on a CPU. The
tokenizer is a real byte-level BPE trained on the fly with the `tokenizers`
library, with ChatML special tokens and a chat template. Its alphabet is
printable ASCII, so every token decodes to whole characters and ASCII text
round-trips exactly (a random model would otherwise emit broken UTF-8).
"""

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
# A template in the style of Qwen's: tools listed in a system turn, assistant
# tool calls rendered as <tool_call>{"name": ..., "arguments": ...}</tool_call>.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message.tool_calls %}{% for tool_call in message.tool_calls %}"
    "{% set tool_call = tool_call.function %}"
    "{{ '<tool_call>{\"name\": \"' + tool_call.name + '\", \"arguments\": ' "
    "+ (tool_call.arguments | tojson) + '}</tool_call>' }}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Hello world! How are you today? I am fine, thank you.",
    "def main():\n    print('hello')\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
    "Tabs\tand newlines\n; punctuation: a-b, c_d, e/f, (g), [h], <i>, ~j, `k`, @l, #m, $n, %o.",
    '{"name": "value", "list": [1, 2, 3], "ok": true}',
]


ASCII_BYTES = set(range(32, 127)) | {9, 10}


def _build_tokenizer(folder: Path, vocab_size: int, markers: bool) -> int:
    from mlx_lm.tokenizer_utils import _byte_decoder
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    ascii_alphabet = [c for c in pre_tokenizers.ByteLevel.alphabet()
                      if _byte_decoder()[c] in ASCII_BYTES]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=ascii_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    if markers:  # ordinary (non-special) added tokens, as reasoning models have
        tokenizer.add_tokens([AddedToken(m, special=False, normalized=False)
                              for m in MARKERS])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": TOOLS_TEMPLATE if markers else CHATML_TEMPLATE,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer.get_vocab_size()


def build_tiny_model(folder, *, seed=0, hidden_size=64, num_layers=2, context=2048,
                     markers=False):
    """Write config.json, model.safetensors and the tokenizer into `folder`.

    `markers` adds <think>/<tool_call> tokens and a tool-aware chat template."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _build_tokenizer(folder, vocab_size=400, markers=markers)
    config = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": hidden_size * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "max_position_embeddings": context,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Spread the logits so that greedy choices are far from ties: batched and
    # solo runs then agree exactly even with float rounding differences.
    weights = {k: (v * 4.0 if k.endswith("lm_head.weight") else v)
               for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder
