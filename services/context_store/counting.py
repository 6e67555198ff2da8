"""Token counts for windows: the model's tokenizer when one is configured
(``BATON_TOKENIZER``, a Hugging Face tokenizer directory or ``tokenizer.json``),
a byte estimate otherwise.

Counts are computed once per message: the session cache keeps each message's
count beside it, and the tokenizer path adds an LRU keyed by the content so a
message seen again (a fork's shared prefix, a reloaded session) is not
re-encoded. Each message costs ``MESSAGE_OVERHEAD`` tokens on top of its
content, for the role and separators a chat template adds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Final

from proto.messages import ChatMessage

MESSAGE_OVERHEAD: Final = 4
BYTES_PER_TOKEN: Final = 4


def estimate_tokens(message: ChatMessage) -> int:
    """Cheap estimate: ~4 bytes a token plus the per-message overhead."""
    return len(message.content.encode()) // BYTES_PER_TOKEN + MESSAGE_OVERHEAD


def _load_encoder(path: str) -> Callable[[str], int]:
    """A function from text to its token count, imported lazily so the store
    runs without ``tokenizers``/``transformers`` when none is configured."""
    p = Path(path)
    file = p if p.is_file() else p / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(file))
        return lambda text: len(fast.encode(text, add_special_tokens=False).ids)
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(path)
    return lambda text: len(slow.encode(text, add_special_tokens=False))


class TokenCounter:
    """Counts a message's tokens; ``name`` says which way (for stats and logs)."""

    def __init__(self, tokenizer: str | None = None, *, cache_size: int = 65_536) -> None:
        self.name = "estimate"
        self._text: Callable[[str], int] | None = None
        if tokenizer:
            self._text = lru_cache(maxsize=cache_size)(_load_encoder(tokenizer))
            self.name = f"tokenizer:{Path(tokenizer).name}"

    def count(self, message: ChatMessage) -> int:
        if self._text is None:
            return estimate_tokens(message)
        return self._text(message.content) + MESSAGE_OVERHEAD
