"""The text of an answer as its tokens arrive, with a bounded amount of tokenizer work per token.

Decoding every id so far at each new token costs O(n) per token, O(n^2) per answer: with the 128256-entry
byte-level tokenizer on one core, 0.05 ms per token at 64 tokens, 0.9 ms at 2048 and 9 ms at 8192, and a server pays
it for every running stream while the decode step waits for the cores. TextStream decodes a window instead (as
text-generation-inference and vLLM do): the tokens after the last emitted piece, plus the tokens of that piece as
context, so that decoders that look at neighbouring tokens (a SentencePiece word's leading space) see them. The new
piece is decode(window) minus decode(context), emitted once it ends on a whole character (a UTF-8 character split
across tokens decodes to U+FFFD until its last byte arrives).

For byte-level tokenizers (Llama 3's) the pieces concatenate to decode(all ids) exactly; `full()` decodes everything
once at the end, so callers that must equal the one-shot decode (a finished answer) can use it. AnswerText adds what
an answer needs on top: the end ids and the stop strings (cut_at_stops' rule).
"""
from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    """ids -> text, token by token. `decode(ids) -> str` is the tokenizer's decode (special tokens skipped)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""  # whole characters so far: the concatenation of what add() returned
        self._prefix = 0  # ids[_prefix:_read]: the last emitted piece, the context of the next one
        self._read = 0

    def add(self, token_id: int) -> str:
        """Appends a token; returns the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        context = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) <= len(context) or window.endswith("\ufffd"):
            return ""
        piece = window[len(context):]
        self.text += piece
        self._prefix, self._read = self._read, len(self.ids)
        return piece

    def full(self) -> str:
        """decode(all ids) in one call (O(n): for the end of an answer)."""
        return self._decode(self.ids)


def cut_at_stops(text: str, stops: Sequence[str] | None) -> tuple[str, bool]:
    """The text up to the first occurrence of each stop string in turn, and whether any occurred."""
    cut = find_stop(text, 0, stops)
    return (text[:cut], True) if cut >= 0 else (text, False)


def find_stop(text: str, start: int, stops: Sequence[str] | None) -> int:
    """Where `text` is cut by the stop strings (the first occurrence of each in turn, searched before the cut of
    the ones before it), looking only
    at occurrences that end at or after `start` (none ends before it: the text before was checked already); -1 when
    there is none. Reads O(len(text) - start + longest stop) characters."""
    cut = -1
    end = len(text)
    for s in stops or ():
        at = text.find(s, max(0, start - len(s) + 1), end)
        if at >= 0:
            cut = end = at  # later stops are looked for in the text before this cut, as cut_at_stops does
    return cut


class AnswerText:
    """An answer's text as its tokens arrive: tokens from the first of `end_ids` on are left out, and the text is cut
    at the stop strings (cut_at_stops' rule), each new piece searched once."""

    def __init__(self, decode: Callable[[list[int]], str], end_ids=(), stops: Sequence[str] | None = None):
        self.stream = TextStream(decode)
        self.end_ids, self.stops = set(end_ids), list(stops or ())
        self.text = ""  # whole characters so far, cut at the first stop string
        self.stopped = False  # a stop string ended the text
        self.ended = False  # an end id came

    def add(self, token_id: int) -> bool:
        """Takes the next token; whether the text grew or was cut."""
        if self.stopped or self.ended:
            return False
        if int(token_id) in self.end_ids:
            self.ended = True
            return False
        checked = len(self.stream.text)
        if not self.stream.add(token_id):
            return False
        cut = find_stop(self.stream.text, checked, self.stops)
        self.stopped = cut >= 0
        self.text = self.stream.text[:cut] if self.stopped else self.stream.text
        return True

    def finish(self) -> str:
        """The final text, as decoding all the kept ids at once and cutting at the stops gives it (a character left
        incomplete at the end decodes to U+FFFD there)."""
        if not self.stopped:
            self.text = cut_at_stops(self.stream.full(), self.stops)[0]
        return self.text
