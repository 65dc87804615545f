"""The documentation site does not lie: it builds strictly, its runnable examples run, and every
setting, public name and finding kind of the code has its place in it."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import querywatch
from querywatch import findings
from querywatch.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE = "<!-- runnable -->"
SNIPPET = re.compile(r'^--8<-- "([^"]+)"\s*$')
FENCE = re.compile(r"^(\s*)(`{3,})(\S*)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)[^)]*\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _hooks() -> Any:
    """docs/hooks.py, the build-time generator of the reference pages."""
    spec = importlib.util.spec_from_file_location("querywatch_docs_hooks", DOCS / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expand_snippets(code: str) -> str:
    """Inline `--8<-- "path"` lines (pymdownx.snippets, paths relative to the repository)."""
    lines = []
    for line in code.splitlines():
        match = SNIPPET.match(line.strip())
        if match:
            lines.append((ROOT / match.group(1)).read_text(encoding="utf-8").rstrip("\n"))
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def runnable_blocks(page: Path) -> Iterator[tuple[int, str]]:
    """(line number, code) of each fenced block that follows a `<!-- runnable -->` marker,
    dedented (blocks inside tabs are indented) and with snippets inlined."""
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() != RUNNABLE:
            index += 1
            continue
        start = index + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        opening = FENCE.match(lines[start]) if start < len(lines) else None
        assert opening, f"{page.name}:{index + 1}: {RUNNABLE} is not followed by a code block"
        indent, fence = opening.group(1), opening.group(2)
        end = start + 1
        while not lines[end].startswith(indent + fence) or lines[end].strip() != fence:
            end += 1
        body = textwrap.dedent("\n".join(lines[start + 1 : end]))
        yield start + 1, expand_snippets(body)
        index = end + 1


def _plain_env() -> dict[str, str]:
    """The environment of a user's shell: no multiprocess metrics, no querywatch settings."""
    return {
        name: value
        for name, value in os.environ.items()
        if name != "PROMETHEUS_MULTIPROC_DIR" and not name.startswith("QUERYWATCH_")
    }


def _all_runnable() -> list[Any]:
    return [
        pytest.param(code, id=f"{page.relative_to(DOCS)}:{line}")
        for page in sorted(DOCS.rglob("*.md"))
        for line, code in runnable_blocks(page)
    ]


@pytest.mark.parametrize("code", _all_runnable())
def test_runnable_example_runs(code: str, tmp_path: Path) -> None:
    """A code block marked runnable in the docs runs as `app.py` and exits 0 (its asserts hold)."""
    (tmp_path / "app.py").write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "app.py"],
        cwd=tmp_path,
        env=_plain_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _finding_kinds() -> set[str]:
    kinds: set[str] = set()
    pending: list[type[findings.Finding]] = [findings.Finding]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.kind != findings.Finding.kind:
            kinds.add(cls.kind)
    return kinds


def test_every_finding_kind_has_a_page_with_a_runnable_example() -> None:
    """Each finding kind in the code has docs/findings/<kind>.md with a runnable example."""
    for kind in sorted(_finding_kinds()):
        page = DOCS / "findings" / f"{kind.replace('_', '-')}.md"
        assert page.exists(), f"finding kind {kind!r} has no page {page.relative_to(ROOT)}"
        assert list(runnable_blocks(page)), f"{page.name} has no runnable example"


def test_every_module_without_an_underscore_is_public_or_a_deprecated_alias() -> None:
    """A new module is internal (a leading underscore) or in the API reference; the only
    exceptions are the 0.1.0 import paths kept as deprecated aliases in docs/hooks.py."""
    hooks = _hooks()
    package = ROOT / "querywatch"
    modules = (
        {
            f"querywatch.{path.stem}"
            for path in package.glob("*.py")
            if not path.stem.startswith("_")
        }
        | {
            f"querywatch.{path.parent.name}"  # subpackages
            for path in package.glob("*/__init__.py")
            if not path.parent.name.startswith("_")
        }
        | {"querywatch"}
    )
    classified = set(hooks.PUBLIC_MODULES) | set(hooks.DEPRECATED_MODULES)
    assert modules == classified


def _links(text: str) -> Iterator[str]:
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        if in_fence:
            continue
        for match in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            yield match.group(1) or match.group(2)


@pytest.mark.parametrize(
    "page",
    [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))],
    ids=lambda page: str(page.relative_to(ROOT)),
)
def test_links_stay_in_the_repository(page: Path) -> None:
    """Every link is to a public https site or to a file of this repository that exists."""
    for target in _links(page.read_text(encoding="utf-8")):
        if target.startswith("https://"):
            continue
        assert not target.startswith(("http://", "/", "file:")), f"{page.name}: {target}"
        path = target.split("#")[0]
        if not path:
            continue
        resolved = (page.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert resolved.exists(), f"{page.name}: {target} does not exist"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as CI builds it: `mkdocs build --strict` (warnings are errors)."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return out


def test_every_setting_is_in_the_configuration_reference(site: Path) -> None:
    """Each `Settings` field, its environment variable and its description are on the page."""
    page = (site / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    for f in dataclasses.fields(Settings):
        assert f"<code>{f.name}</code>" in page, f.name
        assert f"QUERYWATCH_{f.name.upper()}" in page, f.name


def test_configuration_reference_is_generated_from_settings() -> None:
    """The page holds the generator's marker, not a hand-written copy of the table."""
    hooks = _hooks()
    text = (DOCS / "reference" / "configuration.md").read_text(encoding="utf-8")
    assert hooks.SETTINGS_MARKER in text
    assert "| `enabled` |" not in text


def _public_names() -> Iterator[str]:
    for name in querywatch.__all__:
        yield f"querywatch.{name}"
    for module_name in _hooks().PUBLIC_MODULES[1:]:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            yield f"{module_name}.{name}"


def test_every_public_name_is_in_the_api_reference(site: Path) -> None:
    """Each name in `querywatch.__all__` and in the public modules' `__all__` has an entry."""
    page = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    missing = [name for name in _public_names() if f'id="{name}"' not in page]
    assert not missing, (
        f"not in the API reference: {missing} (the reference reads the code statically: a name "
        "of querywatch.__all__ must also be imported under `if TYPE_CHECKING:` in "
        "querywatch/__init__.py)"
    )


def test_metrics_png_is_drawn_from_a_real_scrape(tmp_path: Path) -> None:
    """`examples/metrics_png.py` serves the shop, drives traffic, scrapes /metrics over HTTP and
    writes a PNG (a short run; the committed picture is the default, longer one)."""
    output = tmp_path / "metrics.png"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "metrics_png.py"),
            "--rounds=1",
            "--fixed-rounds=3",
            "--interval=0.2",
            f"--output={output}",
        ],
        env=_plain_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert output.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "requests ->" in result.stdout


def test_committed_metrics_png_is_referenced() -> None:
    """The committed picture exists and the metrics page shows it and says how to redraw it."""
    page = (DOCS / "metrics.md").read_text(encoding="utf-8")
    assert (DOCS / "img" / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert "](img/metrics.png)" in page
    assert "python examples/metrics_png.py" in page
