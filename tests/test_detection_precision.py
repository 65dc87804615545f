"""Precision: everyday CRUD idioms are not findings, and the loops they resemble still are.

What counts as a duplicate (the same read, same parameters, same transaction, no write in
between, no pause), what counts as one statement (the pages of one execution), what walks one
result (pages, chunks) and what loops over items, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    DynamicMapped,
    Mapped,
    Session,
    WriteOnlyMapped,
    immediateload,
    mapped_column,
    relationship,
    selectinload,
)

import querywatch
from querywatch import Settings
from querywatch.findings import finding_id
from tests.callsites import next_line
from tests.conftest import PSYCOPG_URL, require_postgres
from tests.models import Author, Book, create_schema, seeded

STRICT = Settings(n_plus_one_threshold=2)


# -- duplicates: a re-read after a write is not one ------------------------------------------


def test_get_update_commit_refresh_is_not_a_duplicate(any_engine: sa.Engine) -> None:
    """The CRUD update idiom (get, change, commit, refresh) re-reads in a new transaction."""
    seeded(any_engine)
    with querywatch.watch("update") as report, Session(any_engine) as session:
        author = session.get(Author, 1)
        assert author is not None
        author.name = "renamed"
        session.add(author)
        session.commit()
        session.refresh(author)
    assert report.duplicates == ()


def test_attribute_access_after_commit_is_not_a_duplicate(any_engine: sa.Engine) -> None:
    """get, commit, then reading an attribute reloads the expired object: a new transaction."""
    seeded(any_engine)
    with querywatch.watch("expired") as report, Session(any_engine) as session:
        author = session.get(Author, 1)
        assert author is not None
        session.commit()
        assert author.name == "author 0"
    assert report.duplicates == ()


def test_reread_after_a_write_to_its_table_is_not_a_duplicate(any_engine: sa.Engine) -> None:
    """Within one transaction, a read repeated after an UPDATE of its table may see new rows."""
    seeded(any_engine)
    query = sa.select(Author.name).where(Author.id == 1)
    with querywatch.watch("write") as report, any_engine.begin() as conn:
        conn.execute(query).all()
        conn.execute(sa.update(Author).where(Author.id == 1).values(name="x"))
        conn.execute(query).all()
    assert report.duplicates == ()


def test_reread_after_a_rollback_is_not_a_duplicate(any_engine: sa.Engine) -> None:
    """A read repeated after the transaction was rolled back runs in another transaction."""
    seeded(any_engine)
    query = sa.select(Author.name).where(Author.id == 1)
    with querywatch.watch("rollback") as report, any_engine.connect() as conn:
        conn.execute(query).all()
        conn.rollback()
        conn.execute(query).all()
    assert report.duplicates == ()


@pytest.fixture(params=["sqlite-file", "postgresql"])
def pooled_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An instrumented engine whose connections are distinct (a file SQLite, or PostgreSQL)."""
    if request.param == "postgresql":
        require_postgres()
        engine = sa.create_engine(PSYCOPG_URL)
    else:
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'pooled.db'}")
    querywatch.instrument(engine)
    yield engine
    querywatch.uninstrument(engine)
    engine.dispose()


def test_reads_in_two_transactions_are_not_a_duplicate(pooled_engine: sa.Engine) -> None:
    """The same read on two connections at once is two transactions, not a redundant one."""
    seeded(pooled_engine)
    query = sa.select(Author.name).where(Author.id == 1)
    with (
        querywatch.watch("two") as report,
        pooled_engine.connect() as first,
        pooled_engine.connect() as second,
    ):
        first.execute(query).all()
        second.execute(query).all()
    assert report.duplicates == ()


def test_write_to_another_table_leaves_a_duplicate(any_engine: sa.Engine) -> None:
    """A write to a table the read does not touch does not excuse the repeat."""
    seeded(any_engine)
    query = sa.select(Author.name).where(Author.id == 1)
    with querywatch.watch("other-table") as report, any_engine.begin() as conn:
        conn.execute(query).all()
        conn.execute(sa.update(Book).where(Book.id == 1).values(title="x"))
        conn.execute(query).all()
    (finding,) = report.duplicates
    assert finding.count == 2


def test_duplicate_names_every_call_site_involved(any_engine: sa.Engine) -> None:
    """A repeat names the first read's line, then the repeat's, and the finding is at the repeat."""
    seeded(any_engine)
    query = sa.select(Author).where(Author.id == 1)
    with querywatch.watch("sites") as report, Session(any_engine) as session:
        first = next_line()
        session.execute(query).all()
        second = next_line()
        session.execute(query).all()
    (finding,) = report.duplicates
    assert (finding.callsites, finding.callsite) == ((first, second), second)
    assert f"at {first}, then {second}" in finding.describe()


def test_refresh_without_a_write_is_a_duplicate_with_its_own_fix(any_engine: sa.Engine) -> None:
    """refresh() again with nothing written since is redundant; the fix says refresh."""
    seeded(any_engine)
    with querywatch.watch("refresh") as report, Session(any_engine) as session:
        author = session.get(Author, 1)
        assert author is not None
        session.refresh(author)
        again = next_line()
        session.refresh(author)
    (finding,) = report.duplicates
    assert finding.callsites[-1] == again
    assert "session.refresh()" in finding.suggestion


def test_uuid_and_its_string_are_one_value(pg_engine: sa.Engine) -> None:
    """A UUID and its text bound to the same statement are the same parameters."""
    value = uuid.uuid4()
    query = sa.text("SELECT CAST(:v AS uuid)")
    with querywatch.watch("uuid") as report, pg_engine.connect() as conn:
        conn.execute(query, {"v": value}).all()
        conn.execute(query, {"v": str(value)}).all()
    (finding,) = report.duplicates
    assert finding.count == 2


def test_polling_reads_with_a_pause_are_not_a_duplicate(any_engine: sa.Engine) -> None:
    """A loop that re-reads until something changes elsewhere, waiting between reads, is not
    redundant: the pause is the point."""
    seeded(any_engine)
    query = sa.select(Author.name).where(Author.id == 1)
    with querywatch.watch("poll") as report, any_engine.connect() as conn:
        for _ in range(3):
            conn.execute(query).all()
            time.sleep(querywatch._collection.POLL_INTERVAL * 1.5)  # the behaviour under test
    assert report.duplicates == ()


def _read_author(session: Session) -> None:
    session.execute(sa.select(Author).where(Author.id == 1)).all()


def test_duplicate_in_a_shared_helper_names_its_callers(any_engine: sa.Engine) -> None:
    """When both reads ran in one helper, the finding names the lines that called it."""
    seeded(any_engine)
    with querywatch.watch("helper") as report, Session(any_engine) as session:
        first = next_line()
        _read_author(session)
        second = next_line()
        _read_author(session)
    (finding,) = report.duplicates
    assert finding.callers == (first, second)
    assert finding.callsite is not None
    assert finding.callsite.endswith("in _read_author")
    assert f"called from {first}, then {second}" in finding.describe()


def test_duplicate_lookup_beside_a_lazy_load_n_plus_one_is_found(any_engine: sa.Engine) -> None:
    """A lookup repeated in one request is a duplicate even when an N+1 elsewhere lazy-loads
    the same statement (SQLAlchemy 2.1 renders `get()` and a many-to-one load alike)."""
    seeded(any_engine)
    with querywatch.watch("both") as report, Session(any_engine) as session:
        first = next_line()
        session.get(Author, 10)
        session.expunge_all()
        second = next_line()
        session.get(Author, 10)
        for book in session.scalars(sa.select(Book).where(Book.author_id < 10)).all():
            assert book.author is not None
    (n_plus_one,) = report.n_plus_one
    (duplicate,) = report.duplicates
    assert n_plus_one.relationship == "Book.author"
    assert duplicate.callsites == (first, second)


# -- one execution is one statement ------------------------------------------------------------


def test_pages_of_one_insert_are_one_statement(any_engine: sa.Engine) -> None:
    """An insert of 6,000 rows with RETURNING, sent as several pages, counts once and is no
    bulk-write loop."""
    create_schema(any_engine)
    rows = [{"id": i, "name": f"author {i}"} for i in range(1, 6001)]
    with querywatch.watch("bulk") as report, Session(any_engine) as session:
        ids = session.scalars(sa.insert(Author).returning(Author.id), rows).all()
        session.commit()
    assert len(ids) == 6000
    assert report.statements == 1
    assert report.bulk_writes == ()


def test_single_row_inserts_in_a_loop_are_a_bulk_write(any_engine: sa.Engine) -> None:
    """One INSERT per item of a loop is still a bulk-write finding."""
    create_schema(any_engine)
    with querywatch.watch("loop", settings=STRICT) as report, any_engine.begin() as conn:
        for i in range(1, 7):
            conn.execute(sa.insert(Author).values(id=i, name=f"a{i}"))
    (finding,) = report.bulk_writes
    assert finding.count == 6


# -- pages and chunks walk one result; a filter that changes per item is a loop --------------


def test_limit_per_parent_is_an_n_plus_one(any_engine: sa.Engine) -> None:
    """`where(book.author_id == a.id).limit(2)` per author changes its filter: an N+1."""
    seeded(any_engine)
    with querywatch.watch("limit", settings=STRICT) as report, Session(any_engine) as session:
        for author in session.scalars(sa.select(Author)).all():
            where = next_line()
            session.scalars(sa.select(Book).where(Book.author_id == author.id).limit(2)).all()
    (finding,) = report.n_plus_one
    assert (finding.callsite, finding.count) == (where, 10)


def test_offset_pages_of_one_result_are_not_flagged(any_engine: sa.Engine) -> None:
    """LIMIT/OFFSET pages of one filtered result are a walk, not a loop."""
    seeded(any_engine)
    query = sa.select(Book).where(Book.author_id > 0).order_by(Book.id)
    with querywatch.watch("pages", settings=STRICT) as report, Session(any_engine) as session:
        for page in range(5):
            session.scalars(query.limit(5).offset(page * 5)).all()
    assert report.findings == ()


def test_keyset_pages_are_not_flagged(any_engine: sa.Engine) -> None:
    """Keyset pagination (`id > last ORDER BY id LIMIT n`) walks one result."""
    seeded(any_engine)
    with querywatch.watch("keyset", settings=STRICT) as report, Session(any_engine) as session:
        last = 0
        while True:
            query = sa.select(Book).where(Book.id > last).order_by(Book.id).limit(4)
            page = session.scalars(query).all()
            if not page:
                break
            last = page[-1].id
    assert report.findings == ()


def test_in_lists_of_varying_length_per_parent_are_an_n_plus_one(any_engine: sa.Engine) -> None:
    """One `IN (...)` lookup per author with lists of different lengths is a loop."""
    seeded(any_engine)
    with querywatch.watch("in-loop", settings=STRICT) as report, any_engine.connect() as conn:
        for n in range(1, 7):
            where = next_line()
            conn.execute(sa.select(Book.title).where(Book.id.in_(range(1, n + 1)))).all()
    (finding,) = report.n_plus_one
    assert (finding.callsite, finding.count) == (where, 6)


def test_selectinload_chunks_are_not_flagged(any_engine: sa.Engine) -> None:
    """selectinload's own chunks of 500 ids are one batched load."""
    seeded(any_engine, authors=1200, books_per_author=1)
    with querywatch.watch("chunks", settings=STRICT) as report, Session(any_engine) as session:
        authors = session.scalars(sa.select(Author).options(selectinload(Author.books))).all()
    assert len(authors) == 1200
    assert report.findings == ()


def test_text_statements_with_pasted_ids_are_an_n_plus_one(any_engine: sa.Engine) -> None:
    """Ten `text()` statements with the id pasted in are ten different statements: an N+1,
    not a duplicate."""
    seeded(any_engine)
    with querywatch.watch("pasted", settings=STRICT) as report, any_engine.connect() as conn:
        for i in range(1, 11):
            where = next_line()
            conn.execute(sa.text(f"SELECT title FROM books WHERE id = {i}")).all()
    assert report.duplicates == ()
    (finding,) = report.n_plus_one
    assert (finding.callsite, finding.count, finding.distinct) == (where, 10, 10)


# -- relationships loaded outside the lazy loader are named ------------------------------------


def test_immediateload_is_named_with_its_relationship(any_engine: sa.Engine) -> None:
    """`immediateload(Author.books)` runs one SELECT per author: named, with selectinload."""
    seeded(any_engine)
    with querywatch.watch("immediate") as report, Session(any_engine) as session:
        where = next_line()
        session.scalars(sa.select(Author).options(immediateload(Author.books))).all()
    (finding,) = report.n_plus_one
    assert (finding.relationship, finding.callsite) == ("Author.books", where)
    assert "selectinload(Author.books)" in finding.suggestion


class _Base(DeclarativeBase):
    pass


class Shelf(_Base):
    __tablename__ = "shelves"
    id: Mapped[int] = mapped_column(primary_key=True)
    boxes: WriteOnlyMapped[Box] = relationship(order_by="Box.id")
    crates: DynamicMapped[Crate] = relationship(lazy="dynamic", order_by="Crate.id")


class Box(_Base):
    __tablename__ = "boxes"
    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int] = mapped_column(sa.ForeignKey("shelves.id"))


class Crate(_Base):
    __tablename__ = "crates"
    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int] = mapped_column(sa.ForeignKey("shelves.id"))


@pytest.fixture
def shelves(any_engine: sa.Engine) -> sa.Engine:
    _Base.metadata.drop_all(any_engine)
    _Base.metadata.create_all(any_engine)
    with Session(any_engine) as session:
        for i in range(1, 7):
            session.add(Shelf(id=i))
            session.flush()
            session.add_all([Box(id=i, shelf_id=i), Crate(id=i, shelf_id=i)])
        session.commit()
    return any_engine


def test_write_only_relationship_in_a_loop_is_named(shelves: sa.Engine) -> None:
    """`shelf.boxes.select()` per shelf is an N+1 on `Shelf.boxes`, with a fix that works for
    a write-only relationship."""
    with querywatch.watch("write-only") as report, Session(shelves) as session:
        for shelf in session.scalars(sa.select(Shelf)).all():
            session.scalars(shelf.boxes.select()).all()
    (finding,) = report.n_plus_one
    assert finding.relationship == "Shelf.boxes"
    assert "write_only relationship" in finding.suggestion


def test_dynamic_relationship_in_a_loop_is_named(shelves: sa.Engine) -> None:
    """`shelf.crates.all()` per shelf is an N+1 on `Shelf.crates`."""
    with querywatch.watch("dynamic") as report, Session(shelves) as session:
        for shelf in session.scalars(sa.select(Shelf)).all():
            shelf.crates.all()
    (finding,) = report.n_plus_one
    assert finding.relationship == "Shelf.crates"


# -- stable ids and call sites -----------------------------------------------------------------


def test_finding_ids_ignore_line_numbers() -> None:
    """Moving the offending line within its function keeps the finding's id."""
    before = finding_id("n_plus_one", "Author.books", "app/items.py:86 in list_items")
    after = finding_id("n_plus_one", "Author.books", "app/items.py:91 in list_items")
    elsewhere = finding_id("n_plus_one", "Author.books", "app/items.py:86 in show_item")
    assert before == after != elsewhere


def test_generator_expression_is_shown_as_its_function(any_engine: sa.Engine) -> None:
    """A lazy load inside a generator expression is credited to the enclosing function."""
    seeded(any_engine)
    with querywatch.watch("genexpr") as report, Session(any_engine) as session:
        authors = session.scalars(sa.select(Author)).all()
        where = next_line()
        total = sum(len(a.books) for a in authors)
    assert total == 30
    (finding,) = report.n_plus_one
    assert finding.callsite == where
