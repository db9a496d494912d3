"""Stop strings over streamed text, never emitting any part of a stop string.

Text that could be the start of a stop string is held back until the next chunk shows whether it is;
when a stop string matches, everything before it is emitted and the rest is dropped.
"""
from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit now, whether a stop string matched)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(hits)], True
        k = self._holdback(buf)
        self.held = buf[len(buf) - k:] if k else ""
        return buf[:len(buf) - k], False

    def flush(self) -> str:
        """At the end of a request without a match: the held-back text is ordinary text after all."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out
