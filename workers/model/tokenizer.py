"""The model's tokenizer (`tokenizer.json` through the `tokenizers` library).

Encoding and whole-sequence decoding only; incremental, UTF-8-safe detokenization for streaming
lives with the serving engine.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, inner: _HFTokenizer):
        self.inner = inner

    @classmethod
    def from_model_dir(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint directory, or None when it ships none."""
        file = Path(path) / "tokenizer.json"
        return cls(_HFTokenizer.from_file(str(file))) if file.exists() else None

    @property
    def vocab_size(self) -> int:
        return int(self.inner.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Releases the GIL while it works (`encode` would hold it throughout),
        so a long prompt encoded on a worker thread does not stall the event loop."""
        return list(self.inner.encode_batch([text], add_special_tokens=False)[0].ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.inner.decode(ids, skip_special_tokens=True))
