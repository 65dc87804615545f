"""What the benchmarks share: the models, the data they run on, and the N+1 request.

The benchmarks run as scripts (`python benchmarks/x.py`), with this folder first on `sys.path`:
they import this module as `_common`.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

#: The PostgreSQL database the PostgreSQL benchmarks use (trust auth on loopback).
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "bench_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(order_by="Book.id")


class Book(Base):
    __tablename__ = "bench_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("bench_authors.id"))


def seed(session: Session, *, authors: int = 20, books_per_author: int = 3) -> None:
    """`authors` authors with `books_per_author` books each."""
    for a in range(1, authors + 1):
        books = [
            Book(id=a * books_per_author + k, title=f"book {a}.{k}")
            for k in range(books_per_author)
        ]
        session.add(Author(id=a, name=f"author {a}", books=books))
    session.commit()


def build(url: str) -> sa.Engine:
    """An engine on `url` with fresh tables and the `seed()` data."""
    engine = sa.create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(session)
    return engine


def request(engine: sa.Engine) -> int:
    """The 21-statement N+1: every author, then `author.books` lazy-loaded for each."""
    with Session(engine) as session:
        return sum(len(author.books) for author in session.scalars(sa.select(Author)))
