"""What the client tells the user when something fails: one sentence for stderr and an exit code.

Light on purpose (no HTTP library): ``client.py --version`` and ``--help`` import only this,
typer and the terminal helpers.
"""

from __future__ import annotations

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
EXIT_UNREACHABLE = EXIT_USAGE


class Failure(Exception):
    """A one-sentence error for stderr, with the exit code it calls for."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def operator_url(value: str) -> str:
    """The operator's URL from what a user typed (``http://host:8000``, ``host:8000``, ``host``,
    ``:8000``); a ``Failure`` naming the address when it is not one."""
    from odla.core.config import operator_address  # pydantic's import is worth not paying for --version

    try:
        return operator_address(value)
    except ValueError as exc:
        raise Failure(f"--operator {value!r} {exc}", EXIT_USAGE) from None
