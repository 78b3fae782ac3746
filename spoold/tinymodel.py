"""Build a tiny random-weight Llama model on local disk.

`spoold demo` and the test suite need a model vLLM can really load on a
machine with no GPU and no network. This writes one (a few MB) from
nothing: a 2-layer Llama with random weights and a byte-level BPE
tokenizer with a chat template. Its answers are noise, but every code path
from the inbox to the outbox is the real one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: The chat template: plain role-tagged turns, then the assistant prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Score this candidate from 1 to 10 for the data engineer role.",
    "Summarise the ticket in one sentence and give it a priority.",
    "Batch inference on a local GPU keeps data private and costs low.",
    "Every line of the input file gets exactly one line of output.",
    "0 1 2 3 4 5 6 7 8 9 10 yes no maybe high medium low",
]

#: Written last, so a half-built directory is never taken for a model.
_MARKER = "spoold-tiny-model.json"


def default_model_dir() -> Path:
    """Where `spoold demo` keeps its tiny model between runs."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "spoold" / "tiny-llama"


def build_tiny_model(dest: Path, seed: int = 0, hidden_size: int = 128) -> Path:
    """Create the tiny model in `dest` unless it is already there; return `dest`.

    head_dim is kept at 64 because vLLM's CPU attention rejects smaller ones.
    """
    dest = Path(dest)
    if (dest / _MARKER).exists():
        return dest
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "</s>", "<unk>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    (dest / _MARKER).write_text(json.dumps({"seed": seed, "hidden_size": hidden_size}))
    return dest
