"""The README does not lie: its options table is the Settings, its test command is CI's."""

from __future__ import annotations

from pathlib import Path

from querywatch.settings import options_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


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
