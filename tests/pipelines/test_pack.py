"""Tokenization and packing: the .bin/.idx written through megatron-core reads back to the same token ids."""

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from looplm.model.tokenizer import END_OF_DOCUMENT, SPECIAL_TOKENS
from looplm.pipelines.curation.pack import (
    IndexedWriter,
    TokenizerConfig,
    encode,
    open_indexed,
    prepare_tokenizer,
    split_of,
    token_dtype,
)
from looplm.pipelines.synthetic import profile_pages


def test_packed_documents_round_trip_through_megatron(tmp_path):
    texts = profile_pages(60, seed=3)
    tokenizer, added = prepare_tokenizer(TokenizerConfig(vocab_size=600), texts)
    assert added == []  # the trained BPE has every special token, with Ouro's ids first
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    documents = encode(tokenizer, texts, eod)
    assert all(d[-1] == eod and eod not in d[:-1] for d in documents)
    assert tokenizer.decode(documents[0][:-1].tolist()) == texts[0]

    writer = IndexedWriter(tmp_path / "megatron" / "bios_train", token_dtype(tokenizer.get_vocab_size()))
    for doc in documents:
        writer.add(doc)
    writer.finalize()
    assert writer.documents == 60 and writer.tokens == sum(len(d) for d in documents)

    dataset = open_indexed(tmp_path / "megatron" / "bios_train")
    assert len(dataset) == 60
    assert dataset.index.dtype == np.uint16
    for i, doc in enumerate(documents):
        np.testing.assert_array_equal(dataset[i], doc)
    np.testing.assert_array_equal(dataset.sequence_lengths, [len(d) for d in documents])


def test_loaded_tokenizer_gets_missing_special_tokens(tmp_path):
    vocab = {"[UNK]": 0, "a": 1, "b": 2, END_OF_DOCUMENT: 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([END_OF_DOCUMENT])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded, added = prepare_tokenizer(TokenizerConfig(path=str(tmp_path)), [])
    assert added == ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert loaded.token_to_id(END_OF_DOCUMENT) == 3  # existing ids are kept
    assert all(loaded.token_to_id(t) is not None for t in SPECIAL_TOKENS)


def test_split_is_deterministic_and_near_the_fraction():
    keys = [f"bios:{i}" for i in range(20_000)]
    splits = [split_of(k, 0.05) for k in keys]
    assert splits == [split_of(k, 0.05) for k in keys]
    assert 0.04 < splits.count("valid") / len(keys) < 0.06
    assert token_dtype(65_000) == np.uint16 and token_dtype(151_000) == np.int32
