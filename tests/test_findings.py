"""`querywatch.findings`: each finding class describes itself (subject, headline, fix, keys)."""

from __future__ import annotations

import pytest

import querywatch.findings as findings_module
from querywatch.findings import (
    BulkWriteFinding,
    ConnectionLeakFinding,
    DuplicateQueryFinding,
    Finding,
    LazyLoadAfterCloseFinding,
    NPlusOneFinding,
    StaleAllowlistFinding,
    finding_id,
)

SHAPE = "select books.id from books where books.author_id = ?"


def n_plus_one(**fields: object) -> NPlusOneFinding:
    values: dict[str, object] = {
        "id": "n1",
        "callsite": "app.py:10 in handler",
        "fingerprint": SHAPE,
        "operation": "SELECT",
        "count": 10,
        "seconds": 0.012,
        "suggestion": "eager-load it",
    }
    values.update(fields)
    return NPlusOneFinding(**values)  # type: ignore[arg-type]


def leak() -> ConnectionLeakFinding:
    return ConnectionLeakFinding(
        id="l1", callsite="app.py:3", pool="main", held_seconds=0.5, suggestion="close it"
    )


def lazy_after_close() -> LazyLoadAfterCloseFinding:
    return LazyLoadAfterCloseFinding(
        id="c1",
        callsite=None,
        model="Author",
        attribute="books",
        error="DetachedInstanceError",
        suggestion="load it first",
        phase="serialization",
    )


def test_lazy_load_headline_names_the_relationship() -> None:
    """An ORM lazy-load N+1 is headed by its relationship."""
    finding = n_plus_one(relationship="Author.books", pattern="lazy_load")
    assert finding.subject == "Author.books"
    assert finding.headline == "N+1: Author.books lazy-loaded 10 times (12.0 ms)"


@pytest.mark.parametrize(
    ("pattern", "verb", "state"),
    [("expired_load", "reloaded", "expired"), ("deferred_load", "loaded", "deferred")],
)
def test_reloaded_attributes_headline_names_the_model(pattern: str, verb: str, state: str) -> None:
    """Expired or deferred attributes loaded object by object are headed by their model."""
    finding = n_plus_one(pattern=pattern, model="Author", attributes=("bio", "name"))
    assert finding.subject == f"{state} attributes of Author (bio, name)"
    assert (
        finding.headline
        == f"N+1: {state} attributes of Author (bio, name) {verb} 10 times (12.0 ms)"
    )
    assert finding.subject in finding.describe()


def test_statement_loop_headline_is_anonymous() -> None:
    """A loop the ORM cannot attribute is headed by what it did; its shape is the statement."""
    finding = n_plus_one()
    assert finding.headline == "N+1: one statement ran 10 times from one call site (12.0 ms)"
    assert finding.statement == SHAPE
    assert finding.fix == "eager-load it"


def test_statement_findings_explain_a_statement_count() -> None:
    """N+1, bulk-write and duplicate findings are likely causes of a blown budget; others not."""
    bulk = BulkWriteFinding(
        id="b", callsite=None, fingerprint="insert into t values (?)", operation="INSERT",
        count=5, seconds=0.0, suggestion="insert them in one statement",
    )  # fmt: skip
    duplicate = DuplicateQueryFinding(
        id="d", callsite=None, fingerprint=SHAPE, operation="SELECT", count=2, seconds=0.0,
        suggestion="reuse it",
    )  # fmt: skip
    assert [f.explains_statements for f in (n_plus_one(), bulk, duplicate)] == [True] * 3
    assert not leak().explains_statements
    assert not lazy_after_close().explains_statements
    assert bulk.headline == "INSERT in a loop: 5 statements (0.0 ms)"
    assert duplicate.headline == "duplicate query: ran 2 times with the same parameters"


def test_lazy_load_after_close_describes_itself() -> None:
    """A lazy load after close: `Model.attribute`, logged at error, in its phase."""
    finding = lazy_after_close()
    assert finding.subject == "Author.books"
    assert finding.headline == "lazy load after close: Author.books (DetachedInstanceError)"
    assert (finding.level, finding.phase, finding.where) == (
        "error",
        "serialization",
        "unknown call site",
    )
    assert finding.allowlist_keys == {"c1", "Author", "Author.books"}


def test_connection_leak_is_about_its_pool() -> None:
    """A leak's subject and baseline key are its pool; its headline names the owner."""
    finding = leak()
    assert (finding.subject, finding.baseline_key, finding.level) == ("main", "main", "warning")
    assert finding.headline.endswith("held by the Connection opened at app.py:3")
    assert finding.allowlist_keys == {"l1"}


def test_baseline_key_of_an_n_plus_one() -> None:
    """The baseline names a relationship, else the statement shape (cut to 200 characters)."""
    assert n_plus_one(relationship="Author.books").baseline_key == "Author.books"
    long = "select " + "x, " * 100 + "y from t"
    assert n_plus_one(fingerprint=long).baseline_key == long[:200]


def test_allowlist_keys_of_reloaded_attributes() -> None:
    """Expired attributes are allowlisted by the model, by `Model.attribute`, or by shape."""
    finding = n_plus_one(pattern="expired_load", model="Author", attributes=("name",))
    assert finding.allowlist_keys == {"n1", "Author", "Author.name", SHAPE}


def test_ids_come_from_the_class_kind() -> None:
    """`id_for` hashes the class's kind, the subject and the call site."""
    assert NPlusOneFinding.id_for("Author.books", "a.py:1") == finding_id(
        "n_plus_one", "Author.books", "a.py:1"
    )


def test_stale_entry_headline_is_its_description() -> None:
    """A finding without a shorter headline is headed by its description."""
    finding: Finding = StaleAllowlistFinding(
        id="s", callsite=None, entry="Book.tags", suggestion="drop it"
    )
    assert finding.headline == finding.describe()
    assert (finding.subject, finding.fix) == ("Book.tags", "drop it")


def test_kinds_named_elsewhere_are_the_classes_kinds() -> None:
    """The kinds the pytest plugin fails on and the request event counts are the classes'."""
    from querywatch._reporting import FINDING_KINDS
    from querywatch.pytest_plugin import KINDS

    failing = (
        NPlusOneFinding,
        BulkWriteFinding,
        DuplicateQueryFinding,
        LazyLoadAfterCloseFinding,
        ConnectionLeakFinding,
    )
    assert tuple(cls.kind for cls in failing) == KINDS
    assert set(FINDING_KINDS) == {cls.kind for cls in (*failing, StaleAllowlistFinding)}


def test_a_remembered_finding_id_is_the_one_worked_out_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding ids are remembered per kind, subject and call site: a remembered id is the one
    worked out afresh, and ids of other functions or subjects stay apart."""
    monkeypatch.setattr(findings_module, "_finding_ids", {})
    site = "app.py:10 in list_authors"
    first = finding_id("n_plus_one", "Author.books", site)
    remembered = finding_id("n_plus_one", "Author.books", site)
    other_line = finding_id("n_plus_one", "Author.books", "app.py:12 in list_authors")
    other_function = finding_id("n_plus_one", "Author.books", "app.py:30 in show_author")
    other_subject = finding_id("n_plus_one", "Book.author", site)
    monkeypatch.setattr(findings_module, "_finding_ids", {})
    afresh = finding_id("n_plus_one", "Author.books", site)
    assert first == remembered == afresh == other_line  # line numbers are not part of it
    assert len({first, other_function, other_subject}) == 3
