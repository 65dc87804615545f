"""MkDocs hooks: the reference pages are written from the code at build time, never by hand.

- `<!-- querywatch:settings -->` becomes the options table of `querywatch.Settings` (every field,
  its type, default, environment variable and description: `querywatch.settings.options_table`,
  the same table the README carries and `tests/test_readme.py` checks).
- `<!-- querywatch:api -->` becomes one mkdocstrings section per public module, so a new public
  name shows up in the API reference with its docstring, and a module nobody classified as
  public or internal fails `tests/test_docs.py`.
"""

from __future__ import annotations

from typing import Any

SETTINGS_MARKER = "<!-- querywatch:settings -->"
API_MARKER = "<!-- querywatch:api -->"

#: The modules whose names users import (README "Architecture"), in the order they are shown.
PUBLIC_MODULES = (
    "querywatch",
    "querywatch.fastapi",
    "querywatch.middleware",
    "querywatch.testing",
    "querywatch.pytest_plugin",
    "querywatch.otel",
    "querywatch.console",
    "querywatch.pool",
    "querywatch.findings",
    "querywatch.settings",
    "querywatch.fingerprinting",
    "querywatch.exceptions",
)
#: Import paths of 0.1.0 that are internal modules now (`querywatch._collection` ...): they
#: still answer, with a `DeprecationWarning` (`querywatch._moved`), until 0.3.
DEPRECATED_MODULES = (
    "querywatch.collection",
    "querywatch.detection",
    "querywatch.instrumentation",
    "querywatch.metrics",
    "querywatch.reporting",
)


def settings_markdown() -> str:
    """The options table, generated from the `Settings` dataclass."""
    from querywatch.settings import options_table

    return options_table()


def api_markdown() -> str:
    """One mkdocstrings block per public module."""
    # Read statically: `querywatch`'s lazily imported names (PEP 562) are seen through its
    # `if TYPE_CHECKING:` imports, so a name in `__all__` must also be imported there.
    return "\n".join(f"::: {module}\n" for module in PUBLIC_MODULES)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace the markers with the reference generated from the code."""
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_markdown())
    if API_MARKER in markdown:
        markdown = markdown.replace(API_MARKER, api_markdown())
    return markdown
