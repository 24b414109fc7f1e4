"""Hypothesis strategies for what the suite sends: JSON values, unknown fields, text.

Text is any Unicode JSON can carry except NUL (the ingest page refuses a
``\\u0000`` escape on purpose, and Postgres cannot store it) and lone
surrogates (not UTF-8). Non-ASCII text matters: the canonical JSON that
agent frames are signed over keeps it unescaped.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.control import current_build_context
from hypothesis.errors import InvalidArgument

__all__ = ["ChoiceCount", "extras", "json_values", "text"]

text = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12
) | st.sampled_from(["é", "日本", "\U0001f600", "\u2028", 'quote"back\\slash', "</script>"])

# Integers stay within ±2^53 and floats finite: every JSON parser reads them
# back exactly, so a difference is the server's doing.
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=4,
)

# Field names no protocol version uses: "x_" and lowercase letters.
extra_names = st.from_regex(r"x_[a-z]{1,8}", fullmatch=True)


def extras(min_size: int = 1) -> st.SearchStrategy[dict[str, Any]]:
    """Unknown fields to add to a frame, a payload or an event."""
    return st.dictionaries(extra_names, json_values, min_size=min_size, max_size=2)


class ChoiceCount:
    """How many choices the Hypothesis example running when this was made has drawn.

    Made on the example's own thread (Hypothesis keeps its context per thread),
    read from any: the machines' steps run on a portal's thread.
    """

    def __init__(self) -> None:
        try:
            self._data: Any = current_build_context().data
        except InvalidArgument:  # not inside a Hypothesis test
            self._data = None

    def __call__(self) -> int | None:
        return None if self._data is None else len(self._data.choices)
