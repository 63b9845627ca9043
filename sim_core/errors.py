"""The one exception type for bad user input.

Every check of user-supplied files and settings raises :class:`InputError`.
The CLI catches it, prints ``simbench: error: <message>`` as a single line on
stderr and exits with code 2, without a traceback. The message must name the
file (or params key), the record (id or file name) and the problem, so the user
can fix the input without reading code.
"""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input from the user: a file, a record in it, or a setting."""

    def __init__(self, where: str | Path, problem: str, record: str | int | None = None):
        self.where = str(where)
        self.record = record
        self.problem = problem
        text = f"{self.where}: "
        if record is not None:
            text += f"{record}: "
        super().__init__(text + problem)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the iteration and every term."""

    def __init__(self, iteration: int, terms: dict[str, float]):
        self.iteration = iteration
        self.terms = terms
        listed = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        super().__init__(f"non-finite loss at iteration {iteration}: {listed}; "
                         "the last good checkpoint is kept")
