"""N_out for servers that send no usage: METRICS.md says count by retokenising and report the
mismatch. The client kept each such answer's text (record["text"]); with the model's tokenizer
(`factory bench run --tokenizer PATH_OR_HF_ID`) the count becomes the tokenizer's, the chunk count
stays beside it as `n_out_chunks`, and the text is dropped from the record either way."""

from __future__ import annotations

from typing import Any, Protocol


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class TokenizerError(Exception):
    """A --tokenizer that cannot be loaded: one clear line."""


def load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer of a local model directory or a Hugging Face id (transformers)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"--tokenizer {name!r}: {err}") from err


def retokenise(records: list[dict[str, Any]], tokenizer: Tokenizer | None) -> int:
    """Fixes N_out of every record that kept its text; returns how many were retokenised."""
    done = 0
    for rec in records:
        text = rec.pop("text", None)
        if text is None or tokenizer is None:
            continue
        rec["n_out_chunks"] = rec["n_out"]
        rec["n_out"] = len(tokenizer.encode(text, add_special_tokens=False))
        rec["n_out_source"] = "retokenised"
        done += 1
    return done
