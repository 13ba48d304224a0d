"""The study corpus (pipelines/studies.py build_data): the compact question format and repeated packings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from looplm.pipelines.studies import END_OF_DOCUMENT, MultiHopData, StudyEval, build_data

SMALL = MultiHopData(num_layers=3, per_layer=8, num_relations=4, test_questions=40, seq_len=16)


def test_compact_prompts_start_after_end_of_document_and_answer_in_one_token():
    text = build_data(SMALL, StudyEval())
    compact = build_data(dataclasses.replace(SMALL, format="compact"), StudyEval())
    eod = compact.tokenizer.token_to_id(END_OF_DOCUMENT)
    for (prompt, answer), (text_prompt, text_answer) in zip(compact.test, text.test, strict=True):
        ids = compact.tokenizer.encode(prompt).ids
        assert ids[0] == eod and len(ids) == 1 + 1 + SMALL.hops  # <eod>, the person, one relation per hop
        assert answer == text_answer and len(compact.tokenizer.encode(answer).ids) == 1
        assert prompt.split()[1] == text_prompt.rsplit(" of ", 1)[1].split("?")[0]  # the same start person
    # A third of the tokens for the same documents.
    assert compact.train_rows.numel() < 0.45 * text.train_rows.numel()


def test_each_packing_is_a_new_order_of_the_same_documents():
    config = dataclasses.replace(SMALL, format="compact")
    one = build_data(config, StudyEval()).train_rows
    rows = build_data(dataclasses.replace(config, packings=3), StudyEval()).train_rows
    assert rows.shape == (3 * one.shape[0], one.shape[1])
    packings = rows.view(3, *one.shape)
    assert torch.equal(packings[0], one)  # packings=1 is the first of them: earlier studies' rows are unchanged
    width = one.shape[1]
    vocab = int(rows.max()) + 1
    for packing in packings[1:]:
        assert not torch.equal(packing, one)
        # Only the tail that does not fill a row is dropped, so the token counts agree up to one row's width.
        difference = torch.bincount(packing.flatten(), minlength=vocab) - torch.bincount(one.flatten(), minlength=vocab)
        assert int(difference.abs().sum()) <= 2 * width


def test_bad_format_and_packings_are_errors_naming_the_field():
    with pytest.raises(ValueError, match="format must be one of text, compact"):
        MultiHopData(format="short")
    with pytest.raises(ValueError, match="packings must be at least 1"):
        MultiHopData(packings=0)
