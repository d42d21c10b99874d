"""Token ids -> the text each token contributes, and a visible form of whitespace for display."""

from __future__ import annotations

import os
from typing import Sequence

_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, so that "".join(pieces) is the decoded window.

    Byte-level BPE splits multi-byte characters over tokens; decoding each token alone would show
    replacement characters. Decoding growing prefixes (a trailing partial character held back until
    the token completing it) gives each character to that token; the tokens before it get "".
    """
    ids = [int(i) for i in ids]
    pieces, emitted = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[:i + 1], clean_up_tokenization_spaces=False)
        if i < len(ids) - 1:
            cur = cur.rstrip("\ufffd")
        common = len(os.path.commonprefix([cur, emitted]))
        pieces.append(cur[common:])
        emitted = cur
    return pieces


def visible(piece: str, spaces: bool = False) -> str:
    """Newlines and tabs as symbols (↵ ⇥); spaces as · too when `spaces` (a whitespace-only token)."""
    out = "".join(_VISIBLE.get(c, c) for c in piece)
    return out.replace(" ", "·") if spaces else out


def is_blank(piece: str) -> bool:
    return piece.strip() == "" and piece != ""
