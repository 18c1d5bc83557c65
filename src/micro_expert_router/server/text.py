"""Text the server and the chat shell build around a generation: the chat prompt (the model's
template, or a plain fallback) and stop strings matched across streamed pieces.

``StopMatcher`` holds back the tail of the text that could still grow into a stop string, so a
streamed client never receives the start of a stop string that the next piece completes.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..tokenizer import Tokenizer

# For models whose tokenizer_config.json has no chat_template (the bundled demo model, base
# models): a plain Q/A transcript, the form the demo's corpus of fortunes uses for jokes. A
# model continuing past its answer starts the next question, so "\nQ:" is an implicit stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content + '\\n\\n' }}"
    "{% elif m.role == 'user' %}{{ 'Q: ' + m.content + '\\n' }}"
    "{% else %}{{ 'A: ' + m.content + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)
DEFAULT_CHAT_STOPS = ("\nQ:",)


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[str, list[str]]:
    """The prompt text for ``messages`` and the stop strings its template implies."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(list(messages)), []
    text = tokenizer.apply_chat_template(list(messages), template=DEFAULT_CHAT_TEMPLATE)
    return text, list(DEFAULT_CHAT_STOPS)


class StopMatcher:
    """Feed streamed text pieces; get back what is safe to emit and whether a stop matched."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Text to emit now, and True if a stop string appeared (the text before it is
        returned, the stop string and anything after it are dropped)."""
        self.buf += piece
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        keep = 0  # longest tail of buf that is a proper prefix of some stop string
        for k in range(min(self.hold, len(self.buf)), 0, -1):
            tail = self.buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        cut = len(self.buf) - keep
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back text, at the end of a generation that stopped for another reason."""
        out, self.buf = self.buf, ""
        return out
