"""N_out for a server that sends no usage: retokenised with the model's tokenizer, the chunk
count kept beside it, the text never left in the result."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from factory.bench.retokenise import TokenizerError, load_tokenizer, retokenise


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """A real (fast) tokenizer whose tokens are whole words, so the expected counts are obvious."""
    vocab = {"[UNK]": 0, "the": 1, "capital": 2, "is": 3, "paris": 4, ".": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_records_without_usage_are_retokenised_and_lose_their_text():
    records = [
        {"n_out": 2, "n_out_source": "chunks", "text": "the capital is paris ."},  # 2 chunks, 5 tokens
        {"n_out": 7, "n_out_source": "usage"},
    ]
    assert retokenise(records, _word_tokenizer()) == 1
    assert records[0] == {"n_out": 5, "n_out_source": "retokenised", "n_out_chunks": 2}
    assert records[1] == {"n_out": 7, "n_out_source": "usage"}


def test_without_a_tokenizer_the_chunk_count_stays_and_the_text_goes():
    records = [{"n_out": 2, "n_out_source": "chunks", "text": "the capital"}]
    assert retokenise(records, None) == 0
    assert records == [{"n_out": 2, "n_out_source": "chunks"}]


def test_a_tokenizer_that_cannot_load_is_one_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="--tokenizer"):
        load_tokenizer(str(tmp_path / "no-such-model"))
