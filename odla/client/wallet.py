"""The client's wallet: the key it signs in and pays with, and the sign-in tokens it keeps.

The key comes from ``--key-file`` (a file only its owner can read, as node and operator keys
are) or ``ODLA_WALLET_KEY`` (64 hex digits). ``client.py login`` keeps the operator's bearer
token in ``$XDG_CONFIG_HOME/odla/sessions.json`` (``~/.config/odla``), mode 0600, one per
operator URL; every command sends it to that operator when no ``--api-key`` is given.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from odla.client.errors import EXIT_USAGE, Failure

WALLET_ENV = "ODLA_WALLET_KEY"


def wallet(key_file: Optional[str]) -> Any:
    """The wallet's ``Identity``: ``--key-file``, else ``ODLA_WALLET_KEY``; a ``Failure`` saying how to give one."""
    from odla.proofs.identity import Identity, KeyFileError

    try:
        if key_file:
            return Identity.load(key_file, create=False)
        if os.environ.get(WALLET_ENV):
            return Identity.load(None, env_key=os.environ[WALLET_ENV])
    except KeyFileError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    raise Failure(f"no wallet: pass --key-file FILE (a private key, 64 hex digits, mode 0600) or set {WALLET_ENV}",
                  EXIT_USAGE)


def sessions_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "odla" / "sessions.json"


def _read() -> dict[str, Any]:
    try:
        data = json.loads(sessions_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(data: dict[str, Any]) -> None:
    file = sessions_file()
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = file.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a credential: its owner's only
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=1)
    os.replace(temp, file)


def keep(operator: str, session: dict[str, Any]) -> None:
    data = _read()
    data[operator] = session
    _write(data)


def forget(operator: str) -> Optional[dict[str, Any]]:
    data = _read()
    session = data.pop(operator, None)
    if session is not None:
        _write(data)
    return session


def saved_token(operator: str) -> Optional[str]:
    """The bearer token ``login`` kept for ``operator``, while it has not expired."""
    session = _read().get(operator)
    if not isinstance(session, dict) or not isinstance(session.get("token"), str):
        return None
    from odla.core.times import epoch

    ends = epoch(session.get("expires_at", "")) if isinstance(session.get("expires_at"), str) else None
    return session["token"] if ends is None or ends > time.time() else None
