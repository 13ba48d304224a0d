"""Tokenizers as `tokenizer.json` (the `tokenizers` library), the file an Ouro checkpoint carries.

`train_byte_level_bpe` trains the byte-level BPE that looplm uses when no tokenizer is given (the Ouro
tokenizer itself loads with `load_tokenizer`). Special tokens come first, with Ouro's ids for the ones it has:
<|endoftext|> = 0 (end of document), <|im_start|> = 1 and <|im_end|> = 2 (chat markers); then <|pad|> = 3.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_DOCUMENT = "<|endoftext|>"
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (END_OF_DOCUMENT, CHAT_START, CHAT_END, PAD)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of exactly `vocab_size` entries at most, special tokens included."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(byte_alphabet):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the 256 byte symbols and the special tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a `tokenizer.json` file or a checkpoint folder holding one."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {file}")
    return Tokenizer.from_file(str(file))


def special_token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise KeyError(f"tokenizer has no special token {token!r}")
    return token_id
