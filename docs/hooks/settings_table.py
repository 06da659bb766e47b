"""MkDocs hook: the settings table in docs/configuration.md, made from odla.core.config at build time,
so that it cannot drift from the code. A page marks its place with ``<!-- settings-table -->``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from odla.core.config import ENV_KEYS, ROLES, SHARED, Settings  # noqa: E402
from odla.node.capacity import PARALLEL_ENV  # noqa: E402  (read as Ollama reads it, not through ENV_KEYS)

MARK = "<!-- settings-table -->"


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        value = field.default_factory()
        return "none" if not value else f"`{value}`"
    if field.default is None:
        return "see meaning"
    return f"`{field.default}`"


def _roles(name: str) -> str:
    if name in SHARED:
        return "all"
    return ", ".join(role for role in ("operator", "node", "client") if name in ROLES[role])


def settings_table() -> str:
    env: dict[str, list[str]] = {}
    for var, key in ENV_KEYS.items():
        env.setdefault(key, []).append(f"`{var}`")
    env.setdefault("num_parallel", []).append(f"`{PARALLEL_ENV}`")
    rows = ["| key | default | read by | meaning | environment |", "|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {_default(name)} | {_roles(name)} | {meaning} | {', '.join(env.get(name, []))} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    return markdown.replace(MARK, settings_table()) if MARK in markdown else markdown
