"""Incremental detokenization: text for new tokens as they arrive, correct across token boundaries.

Decoding one token at a time is wrong for byte-level BPE (a multi-byte UTF-8 character spans tokens)
and for SentencePiece (a leading space depends on the previous token). Like vLLM, we decode a short
window of earlier tokens plus the new ones and emit only the text past the window, holding back text
that ends in an incomplete character (U+FFFD) until the next token completes it.
"""
from __future__ import annotations

_WINDOW = 6  # tokens of left context decoded with each new token


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - _WINDOW, 0)
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def _emit(self, force: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not force):
            return ""
        new = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new

    def step(self, new_ids: list[int]) -> str:
        """Append generated ids; return the text they complete (possibly "")."""
        self.ids.extend(new_ids)
        return self._emit(force=False)

    def flush(self) -> str:
        """At the end of a request: whatever is still held back (an incomplete character included)."""
        if self.read_offset == len(self.ids):
            return ""
        return self._emit(force=True)
