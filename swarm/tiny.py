"""Tiny models of real transformers architectures, made locally (no downloads).

The demo and the tests train these: the same classes as the big models (Llama, Qwen2,
Mistral), shrunk to a few hundred thousand parameters, with a byte-level BPE tokenizer
trained on the given text so that the loss means something.
"""

from __future__ import annotations

from pathlib import Path

# A chat template in the ChatML style, so that `data.format: chat` works on tiny models.
# `{% generation %}` marks assistant text so transformers can build the assistant mask.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
ARCHITECTURES = ("llama", "qwen2", "mistral")


def train_tokenizer(text_files: list[Path], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``text_files``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(p) for p in text_files], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(arch: str, vocab_size: int, hidden: int = 128, layers: int = 2):
    """A transformers config of ``arch`` shrunk to ``hidden`` width and ``layers`` depth.

    The weights are initialised wider than usual (std 0.2, not 0.02): with a random, frozen
    base and a frozen output head, a LoRA adapter can only move the logits far enough to
    learn a text when the head's rows are not tiny.
    """
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        initializer_range=0.2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def make_tiny_model(
    out_dir: str | Path,
    text_files: list[str | Path],
    arch: str = "llama",
    vocab_size: int = 512,
    hidden: int = 128,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised tiny model and its tokenizer to ``out_dir``.

    The result is deterministic for a given seed and text, and loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` like any hub model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer([Path(p) for p in text_files], vocab_size)
    config = model_config(arch, len(tokenizer), hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
