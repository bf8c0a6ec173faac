"""Tiny models of real transformers architectures, made locally (no downloads).

The demo and the tests train these: the same classes as the big models (Llama, Qwen2,
Mistral), shrunk to a few hundred thousand parameters, with a tokenizer trained on the given
text so that the loss means something: byte-level BPE (as GPT-2, Llama 3 and Qwen2 use), or
SentencePiece BPE with byte fallback (as Llama 2 and Mistral use). Only the second converts
to GGUF: llama.cpp's converter knows BPE tokenizers by a hash of their output on a test
text, so it accepts the released ones only, while it reads any SentencePiece model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from swarm.errors import UserError

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
TOKENIZERS = ("bpe", "sentencepiece")


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


def train_sentencepiece(text_files: list[Path], vocab_size: int, folder: Path):
    """A SentencePiece BPE tokenizer trained on ``text_files``, saved as ``folder/tokenizer.model``.

    Llama 2's layout: ``<unk>``, ``<s>``, ``</s>`` at ids 0-2, BOS added to every text, byte
    fallback (no text is unknown), text kept as it is (no normalisation, spaces kept), the
    ChatML markers as whole tokens. Returned as the transformers tokenizer converted from
    that file; the file stays in ``folder``, since transformers saves only ``tokenizer.json``.

    Raises:
        UserError: ``vocab_size`` is too small for the bytes and characters of the text.
    """
    try:
        import sentencepiece as spm
    except ImportError:
        raise UserError("a SentencePiece tokenizer needs the sentencepiece package: pip install 'swarm-train[gguf]'") from None
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(str(p) for p in text_files), model_prefix=str(folder / "tokenizer"),
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
            split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=SPECIAL_TOKENS[2:],
            num_threads=1, minloglevel=2,
        )
    except RuntimeError as exc:
        # sentencepiece says e.g. "Vocabulary size is smaller than required_chars. 200 vs 296. ..."
        need = re.search(r"(\d+) vs (\d+)", str(exc))
        why = f"its bytes and characters alone take {need.group(2)}" if need else " ".join(str(exc).split())
        raise UserError(f"cannot train a SentencePiece tokenizer of {vocab_size} tokens on this text ({why}); "
                        "raise --vocab-size") from None
    (folder / "tokenizer.vocab").unlink()
    # The markers as added tokens, in the file llama.cpp's converter reads to keep them whole.
    piece_ids = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = {marker: piece_ids.piece_to_id(marker) for marker in SPECIAL_TOKENS[2:]}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    # legacy: a space starts the text after each special token, as in sentencepiece and llama.cpp;
    # set in init_kwargs too, or save_pretrained leaves it out and the next load forgets it.
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, legacy=True)
    tokenizer.init_kwargs["legacy"] = True
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(arch: str, vocab_size: int, hidden: int = 128, layers: int = 2, special_ids=(0, 0, 1)):
    """A transformers config of ``arch`` shrunk to ``hidden`` width and ``layers`` depth.

    The weights are initialised wider than usual (std 0.2, not 0.02): with a random, frozen
    base and a frozen output head, a LoRA adapter can only move the logits far enough to
    learn a text when the head's rows are not tiny. ``special_ids`` are the BOS, EOS and
    padding token ids (padding None when the tokenizer has none).
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
        bos_token_id=special_ids[0],
        eos_token_id=special_ids[1],
        pad_token_id=special_ids[2],
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
    tokenizer: str = "bpe",
) -> Path:
    """Write a randomly initialised tiny model and its tokenizer to ``out_dir``.

    The result is deterministic for a given seed and text, and loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` like any hub model. ``tokenizer`` is
    ``bpe`` (byte-level) or ``sentencepiece`` (which llama.cpp's GGUF converter accepts).
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    texts = [Path(p) for p in text_files]
    if tokenizer == "sentencepiece":
        tok = train_sentencepiece(texts, vocab_size, out)
    elif tokenizer == "bpe":
        tok = train_tokenizer(texts, vocab_size)
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    special = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    config = model_config(arch, len(tok), hidden=hidden, layers=layers, special_ids=special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
