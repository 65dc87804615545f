"""Detection: N+1 per relationship, expired loads, the statement-shape backstop, bulk writes,
duplicates and what must not be flagged, on real databases."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, joinedload, load_only, selectinload

import querywatch
from querywatch import Settings
from querywatch._collection import current_collector
from querywatch.findings import NPlusOneFinding
from tests.callsites import next_line
from tests.models import Author, Base, Book, Publisher, Tag, create_schema, seed, seeded

STRICT = Settings(n_plus_one_threshold=2)


def test_one_to_many_lazy_loads_are_an_n_plus_one(any_engine: sa.Engine) -> None:
    """Touching `author.books` per author is one finding naming the relationship, line and fix."""
    seeded(any_engine)
    with querywatch.watch("o2m") as report, Session(any_engine) as session:
        for author in session.scalars(sa.select(Author)):
            where = next_line()
            assert author.books
    (finding,) = report.n_plus_one
    assert (finding.relationship, finding.callsite, finding.count) == ("Author.books", where, 10)
    assert finding.pattern == "lazy_load"
    assert "selectinload(Author.books)" in finding.suggestion
    assert "where ? = books.author_id" in finding.fingerprint
    assert finding.seconds > 0


def test_many_to_one_lazy_loads_suggest_joinedload(any_engine: sa.Engine) -> None:
    """Touching `book.publisher` per book suggests `joinedload(Book.publisher)`."""
    seeded(any_engine)
    with querywatch.watch("m2o") as report, Session(any_engine) as session:
        for book in session.scalars(sa.select(Book)):
            where = next_line()
            assert book.publisher is not None
    (finding,) = report.n_plus_one
    assert (finding.relationship, finding.callsite) == ("Book.publisher", where)
    # Ten distinct publishers: the other twenty books find theirs in the identity map.
    assert finding.count == 10
    assert "joinedload(Book.publisher)" in finding.suggestion


def test_many_to_many_lazy_loads_are_an_n_plus_one(any_engine: sa.Engine) -> None:
    """A `secondary` relationship touched per object is flagged like any collection."""
    seeded(any_engine)
    with querywatch.watch("m2m") as report, Session(any_engine) as session:
        for book in session.scalars(sa.select(Book)):
            where = next_line()
            assert book.tags
    (finding,) = report.n_plus_one
    assert (finding.relationship, finding.callsite, finding.count) == ("Book.tags", where, 30)
    assert "selectinload(Book.tags)" in finding.suggestion


def test_nested_n_plus_one_is_one_finding_per_level(sqlite_engine: sa.Engine) -> None:
    """Authors -> books -> chapters gives two findings; the inner fix names the whole path."""
    seeded(sqlite_engine)
    with querywatch.watch("nested") as report, Session(sqlite_engine) as session:
        for author in session.scalars(sa.select(Author)):
            outer = next_line()
            for book in author.books:
                inner = next_line()
                assert book.chapters
    by_relationship = {f.relationship: f for f in report.n_plus_one}
    assert set(by_relationship) == {"Author.books", "Book.chapters"}
    assert by_relationship["Author.books"].callsite == outer
    chapters = by_relationship["Book.chapters"]
    assert (chapters.callsite, chapters.count) == (inner, 30)
    assert "selectinload(Author.books).selectinload(Book.chapters)" in chapters.suggestion


def test_expired_attributes_after_commit_are_an_n_plus_one(any_engine: sa.Engine) -> None:
    """Reading a column of each object after `commit()` reloads them one by one: flagged."""
    seeded(any_engine)
    with querywatch.watch("expired") as report, Session(any_engine) as session:
        authors = session.scalars(sa.select(Author)).all()
        session.commit()
        for author in authors:
            where = next_line()
            assert author.name
    (finding,) = report.n_plus_one
    assert (finding.pattern, finding.model) == ("expired_load", "Author")
    assert finding.attributes == ("name",)
    assert (finding.relationship, finding.callsite, finding.count) == (None, where, 10)
    assert "expire_on_commit=False" in finding.suggestion
    assert "expired attributes of Author (name)" in finding.describe()


def test_deferred_column_per_object_suggests_undefer(sqlite_engine: sa.Engine) -> None:
    """A column left out by `load_only` and read per object is flagged with `undefer(...)`."""
    seeded(sqlite_engine)
    with querywatch.watch("deferred") as report, Session(sqlite_engine) as session:
        for author in session.scalars(sa.select(Author).options(load_only(Author.id))):
            assert author.name
    (finding,) = report.n_plus_one
    assert (finding.pattern, finding.model) == ("deferred_load", "Author")
    assert "undefer(Author.name)" in finding.suggestion


def test_session_get_loop_is_a_backstop_n_plus_one(any_engine: sa.Engine) -> None:
    """`session.get()` per id is flagged by shape and call site, with a one-query fix."""
    seeded(any_engine)
    with querywatch.watch("get") as report, Session(any_engine) as session:
        for book_id in range(1, 8):
            where = next_line()
            assert session.get(Book, book_id) is not None
    (finding,) = report.n_plus_one
    assert (finding.relationship, finding.callsite, finding.count) == (None, where, 7)
    assert finding.pattern == "statement_loop"
    assert "select ... where books.id in (...)" in finding.suggestion
    assert "select(Book).where(Book.id.in_(keys))" in finding.suggestion


def test_text_query_loop_is_a_backstop_n_plus_one(any_engine: sa.Engine) -> None:
    """A Core `text()` query per item is flagged at its line."""
    seeded(any_engine)
    with querywatch.watch("text") as report, any_engine.connect() as conn:
        for author_id in range(1, 7):
            where = next_line()
            conn.execute(sa.text("SELECT title FROM books WHERE author_id = :a"), {"a": author_id})
    (finding,) = report.n_plus_one
    assert (finding.callsite, finding.count, finding.distinct) == (where, 6, 6)
    assert "select ... where books.author_id in (...)" in finding.suggestion


def test_insert_loop_is_a_bulk_write_finding(any_engine: sa.Engine) -> None:
    """One INSERT per item is a bulk-write finding suggesting `insert()` with a list, not N+1."""
    seeded(any_engine)
    with querywatch.watch("insert") as report, any_engine.begin() as conn:
        for i in range(6):
            where = next_line()
            conn.execute(sa.insert(Tag.__table__), {"id": 100 + i, "name": f"t{i}"})
    assert report.n_plus_one == ()
    (finding,) = report.bulk_writes
    assert (finding.operation, finding.callsite, finding.count) == ("INSERT", where, 6)
    assert "insert(Tag)" in finding.suggestion
    assert "list of rows" in finding.suggestion


def test_eager_loaded_loops_are_not_flagged(any_engine: sa.Engine) -> None:
    """`selectinload` and `joinedload` loops run a fixed number of statements: nothing flagged."""
    seeded(any_engine)
    with querywatch.watch("eager") as report, Session(any_engine) as session:
        stmt = sa.select(Author).options(selectinload(Author.books).selectinload(Book.tags))
        for author in session.scalars(stmt):
            for book in author.books:
                assert book.tags
        books = session.scalars(sa.select(Book).options(joinedload(Book.publisher))).all()
        assert all(book.publisher is not None for book in books)
    assert report.findings == ()


def test_selectinload_batches_over_500_ids_are_not_flagged(sqlite_engine: sa.Engine) -> None:
    """`selectinload` over 1,200 parents runs three IN batches from one line: not an N+1."""
    create_schema(sqlite_engine)
    with sqlite_engine.begin() as conn:
        conn.execute(
            sa.insert(Author.__table__), [{"id": i, "name": f"a{i}"} for i in range(1, 1201)]
        )
    with querywatch.watch("batches", settings=STRICT) as report, Session(sqlite_engine) as session:
        authors = session.scalars(sa.select(Author).options(selectinload(Author.books))).all()
        assert len(authors) == 1200
    assert report.statements == 4
    assert report.findings == ()


def test_chunked_in_batches_are_not_flagged(any_engine: sa.Engine) -> None:
    """A Core loop over chunks of ids with `IN (...)` is batching, not N+1."""
    seeded(any_engine)
    ids = list(range(1, 31))
    with querywatch.watch("chunks", settings=STRICT) as report, any_engine.connect() as conn:
        for start in range(0, 30, 5):
            chunk = ids[start : start + 5]
            conn.execute(sa.select(Book.__table__).where(Book.__table__.c.id.in_(chunk)))
    assert report.findings == ()


def test_pagination_walks_are_not_flagged(any_engine: sa.Engine) -> None:
    """LIMIT/OFFSET pages and keyset pages from one line are a walk, not an N+1."""
    seeded(any_engine)
    books = Book.__table__
    with querywatch.watch("pages", settings=STRICT) as report, any_engine.connect() as conn:
        for page in range(6):
            conn.execute(sa.select(books).order_by(books.c.id).limit(5).offset(page * 5))
        last = 0
        while rows := conn.execute(
            sa.select(books.c.id).where(books.c.id > last).order_by(books.c.id).limit(5)
        ).all():
            last = rows[-1].id
    assert report.findings == ()


def test_single_lazy_load_and_short_loops_are_not_flagged(any_engine: sa.Engine) -> None:
    """One lazy load, and a loop of four (below the default threshold of five), are fine."""
    seeded(any_engine)
    with querywatch.watch("short") as report, Session(any_engine) as session:
        first = session.get(Author, 1)
        assert first is not None
        assert first.books
        for author in session.scalars(sa.select(Author).where(Author.id.between(2, 5))):
            assert author.books
        for book_id in range(1, 5):
            session.get(Book, book_id)
    assert report.findings == ()


def test_the_threshold_is_a_setting(sqlite_engine: sa.Engine) -> None:
    """With the strict threshold of two, a loop of two is flagged."""
    seeded(sqlite_engine)
    with querywatch.watch("strict", settings=STRICT) as report, Session(sqlite_engine) as session:
        for author in session.scalars(sa.select(Author).where(Author.id <= 2)):
            assert author.books
    assert [f.relationship for f in report.n_plus_one] == ["Author.books"]


def test_savepoints_in_a_loop_are_not_flagged(any_engine: sa.Engine) -> None:
    """SAVEPOINT/RELEASE per item is transaction control, never N+1 or duplicate."""
    seeded(any_engine)
    with querywatch.watch("savepoints", settings=STRICT) as report, Session(any_engine) as session:
        for i in range(6):
            with session.begin_nested():
                session.add(Publisher(id=100 + i, name=f"p{i}"))
        session.commit()
    assert report.n_plus_one == ()
    assert report.duplicates == ()


def test_repeated_identical_query_is_a_duplicate_not_an_n_plus_one(any_engine: sa.Engine) -> None:
    """The same statement with the same parameters three times is one duplicate finding."""
    seeded(any_engine)
    with querywatch.watch("dup") as report, any_engine.connect() as conn:
        for _ in range(3):
            where = next_line()
            conn.execute(sa.text("SELECT name FROM authors WHERE id = :i"), {"i": 1})
    assert report.n_plus_one == ()
    (finding,) = report.duplicates
    assert (finding.callsite, finding.count) == (where, 3)
    assert finding.operation == "SELECT"
    assert "run it once" in finding.suggestion


def test_lazy_n_plus_one_is_not_also_a_backstop_or_duplicate(any_engine: sa.Engine) -> None:
    """The statements of a lazy-load N+1 are reported once, as that relationship's finding."""
    seeded(any_engine)
    with querywatch.watch("once") as report, Session(any_engine) as session:
        for book in session.scalars(sa.select(Book)):
            assert book.author.books
    assert {f.relationship for f in report.findings} == {"Book.author", "Author.books"}
    assert report.duplicates == ()
    assert all(f.relationship is not None for f in report.n_plus_one)


def test_a_loop_with_distinct_parameters_is_not_a_duplicate(sqlite_engine: sa.Engine) -> None:
    """An N+1 loop reports an N+1, not duplicates."""
    seeded(sqlite_engine)
    with querywatch.watch("distinct") as report, sqlite_engine.connect() as conn:
        for i in range(1, 7):
            conn.execute(sa.text("SELECT name FROM authors WHERE id = :i"), {"i": i})
    assert (len(report.n_plus_one), report.duplicates) == (1, ())


def test_finding_ids_are_stable_across_units(sqlite_engine: sa.Engine) -> None:
    """The same problem at the same line has the same id in every unit of work."""
    seeded(sqlite_engine)
    ids = []
    for _ in range(2):
        with querywatch.watch("stable") as report, Session(sqlite_engine) as session:
            for author in session.scalars(sa.select(Author)):
                assert author.books
        ids.append(report.n_plus_one[0].id)
    assert ids[0] == ids[1]


def test_parameter_values_never_reach_findings(sqlite_engine: sa.Engine) -> None:
    """Findings carry shapes and hashes only, never the bound values."""
    seeded(sqlite_engine)
    secret = "s3cret-value"
    with querywatch.watch("privacy") as report, sqlite_engine.connect() as conn:
        for i in range(6):
            conn.execute(sa.text("SELECT id FROM authors WHERE name = :n"), {"n": f"{secret}{i}"})
        for _ in range(2):
            conn.execute(sa.text("SELECT id FROM authors WHERE name = :n"), {"n": secret})
    assert report.findings
    assert all(secret not in repr(f.as_log_fields()) for f in report.findings)


async def _seed_async(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(engine) as session:
        await session.run_sync(seed)


async def test_awaitable_attrs_loop_is_flagged_like_sync(any_async_engine: AsyncEngine) -> None:
    """`await author.awaitable_attrs.books` per author is the same finding as the sync loop."""
    await _seed_async(any_async_engine)
    async with querywatch.watch("awaitable") as report, AsyncSession(any_async_engine) as session:
        for author in (await session.scalars(sa.select(Author))).all():
            where = next_line()
            assert await author.awaitable_attrs.books
    (finding,) = report.findings
    assert isinstance(finding, NPlusOneFinding)
    assert (finding.relationship, finding.callsite, finding.count) == ("Author.books", where, 10)
    assert "selectinload(Author.books)" in finding.suggestion


async def test_run_sync_loop_is_flagged_like_sync(any_async_engine: AsyncEngine) -> None:
    """Lazy loads inside `session.run_sync(fn)` are flagged at the line in `fn`."""
    await _seed_async(any_async_engine)

    def touch_books(session: Session) -> None:
        for author in session.scalars(sa.select(Author)):
            nonlocal where
            where = next_line()
            assert author.books

    where = ""
    async with querywatch.watch("run_sync") as report, AsyncSession(any_async_engine) as session:
        await session.run_sync(touch_books)
    (finding,) = report.findings
    assert isinstance(finding, NPlusOneFinding)
    assert (finding.relationship, finding.callsite, finding.count) == ("Author.books", where, 10)


def test_findings_carry_the_phase_of_the_loads(sqlite_engine: sa.Engine) -> None:
    """Lazy loads made while a response is serialised are marked `phase="serialization"`."""
    seeded(sqlite_engine)
    with querywatch.watch("phase") as report, Session(sqlite_engine) as session:
        authors = session.scalars(sa.select(Author)).all()
        collector = current_collector()
        assert collector is not None
        collector.phase = "serialization"  # what the middleware sets while rendering
        assert all(author.books for author in authors)
    (finding,) = report.n_plus_one
    assert finding.phase == "serialization"


def test_a_nested_unit_finding_is_also_in_the_enclosing_report(sqlite_engine: sa.Engine) -> None:
    """Lazy loads count in every enclosing unit; the finding is reported by the inner one."""
    seeded(sqlite_engine)
    with querywatch.watch("outer") as outer, Session(sqlite_engine) as session:
        session.execute(sa.text("SELECT 1"))
        with querywatch.watch("inner") as inner:
            for author in session.scalars(sa.select(Author)):
                assert author.books
    assert [f.id for f in outer.n_plus_one] == [f.id for f in inner.n_plus_one]
    assert outer.findings_to_report() == ()
