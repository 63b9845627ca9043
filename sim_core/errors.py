"""The one exception type for bad user input.

Every check of user-supplied files and settings raises :class:`InputError`.
The CLI catches it, prints ``simbench: error: <message>`` as a single line on
stderr and exits with code 2, without a traceback. The message must name the
file (or params key), the record (id or file name) and the problem, so the user
can fix the input without reading code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

# The longest stretch of a user's value an error message quotes (a value can be megabytes long).
QUOTE_LIMIT = 100
# The longest message at all: a safety net for values formatted without :func:`quote`.
MESSAGE_LIMIT = 1000


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters.

    Containers are formatted only as far as the limit reaches, so a huge value
    (an expanded YAML anchor bomb, a long list) costs no time or memory here.
    """
    return shorten(_bounded_repr(value, limit + 1), limit)


def _bounded_repr(value: Any, budget: int) -> str:
    if isinstance(value, (list, tuple)):
        opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
        parts, used = [], 1
        for item in value:
            if used > budget:
                break
            part = _bounded_repr(item, budget - used)
            parts.append(part)
            used += len(part) + 2
        return opening + ", ".join(parts) + closing
    if isinstance(value, dict):
        parts, used = [], 1
        for key, item in value.items():
            if used > budget:
                break
            part = f"{_bounded_repr(key, budget - used)}: {_bounded_repr(item, budget - used)}"
            parts.append(part)
            used += len(part) + 2
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, str) and len(value) > budget:
        value = value[:budget]
    return repr(value)


class InputError(Exception):
    """Bad input from the user: a file, a record in it, or a setting."""

    def __init__(self, where: str | Path, problem: str, record: str | int | None = None):
        self.where = shorten(str(where), MESSAGE_LIMIT // 4)
        self.record = record
        self.problem = problem
        text = f"{self.where}: "
        if record is not None:
            text += f"{shorten(str(record), MESSAGE_LIMIT // 4)}: "
        # One line, whatever the parts hold: newlines would break the one-line contract.
        text = " ".join((text + problem).splitlines())
        super().__init__(shorten(text, MESSAGE_LIMIT))


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the iteration and every term."""

    def __init__(self, iteration: int, terms: dict[str, float]):
        self.iteration = iteration
        self.terms = terms
        listed = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        super().__init__(f"non-finite loss at iteration {iteration}: {listed}; "
                         "the last good checkpoint is kept")
