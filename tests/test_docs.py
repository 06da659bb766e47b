"""The README and the docs site: short, linked, generated where they could drift, no history."""

import importlib.util
import re
import shutil
import subprocess

from odla.core.config import ENV_KEYS, Settings
from tests.helpers import ROOT

DOCS = ROOT / "docs"


def hook():
    spec = importlib.util.spec_from_file_location("settings_table", DOCS / "hooks" / "settings_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_short_and_its_links_lead_somewhere():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text and "Open WebUI" in text
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / target).is_file(), target


def test_the_settings_table_is_made_from_the_settings_model():
    page = (DOCS / "configuration.md").read_text()
    assert hook().MARK in page  # the table is put there at build time, never written by hand
    table = hook().on_page_markdown(page)
    for name, field in Settings.model_fields.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert field.description and " ".join(field.description.split())[:40] in row, name
    for var in ENV_KEYS:
        assert f"`{var}`" in table, var


def test_the_docs_state_what_is_true_now_not_how_it_came_to_be():
    for page in DOCS.glob("*.md"):
        text = page.read_text()
        assert not re.search(r"\b[Ii]ssue \d+|this session|previous session", text), page.name


def test_the_site_builds_with_no_broken_link(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(ROOT / ".venv" / "bin")) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is in requirements-dev.txt"
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"NO_MKDOCS_2_WARNING": "1",
                                                                             "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").read_text().count("<tr>") > len(Settings.model_fields)
