"""The README does not lie: its options table is the Settings, its test command is CI's, and it
stays a few screens that lead into every page of the documentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from querywatch.settings import options_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAX_LINES = 250


def test_options_table_matches_settings() -> None:
    """Every setting, type, default and environment variable in the README is the real one."""
    assert options_table() in README, (
        "README.md's options table is out of date; regenerate it with "
        "python -c 'from querywatch.settings import options_table; print(options_table())'"
    )


def test_ci_runs_the_readme_test_command() -> None:
    """`.ci/run` extracts the command after the README's test-command marker."""
    marker = README.index("<!-- test-command -->")
    command = README[marker:].splitlines()[2]
    assert command.startswith("python3 -m venv .venv")
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_shows_the_demo_command() -> None:
    """The first of the two commands, the demo, is in the README as a user types it."""
    assert "\npython3 examples/run_demo.py\n" in README


def test_readme_is_a_few_screens() -> None:
    """Everything beyond what it finds, the two commands, install, quickstart and options
    belongs in docs/."""
    lines = len(README.splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move sections to docs/"


def _nav_pages(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def test_readme_links_every_documentation_page() -> None:
    """Each page of the site's navigation is one click from the README."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    pages = [page for page in _nav_pages(config["nav"]) if page != "changelog.md"]
    missing = [page for page in pages if f"(docs/{page}" not in README]
    assert not missing, f"README.md links none of {missing}"
