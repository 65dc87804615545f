"""ORM models the tests share: authors, books, publishers and tags (typed 2.0 style)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

book_tags = sa.Table(
    "book_tags",
    sa.MetaData(),
    sa.Column("book_id", sa.ForeignKey("books.id"), primary_key=True),
    sa.Column("tag_id", sa.ForeignKey("tags.id"), primary_key=True),
)


class Base(AsyncAttrs, DeclarativeBase):
    metadata = book_tags.metadata


class Publisher(Base):
    __tablename__ = "publishers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("authors.id"))
    publisher_id: Mapped[int | None] = mapped_column(sa.ForeignKey("publishers.id"))
    author: Mapped[Author] = relationship(back_populates="books")
    publisher: Mapped[Publisher | None] = relationship()
    tags: Mapped[list[Tag]] = relationship(secondary=book_tags, order_by="Tag.id")
    chapters: Mapped[list[Chapter]] = relationship(order_by="Chapter.id")


class Chapter(Base):
    __tablename__ = "chapters"
    id: Mapped[int] = mapped_column(primary_key=True)
    book_id: Mapped[int] = mapped_column(sa.ForeignKey("books.id"))
    title: Mapped[str]


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


def seed(session: Session, *, authors: int = 10, books_per_author: int = 3) -> None:
    """Authors with books; each book has a publisher, two tags and two chapters."""
    publishers = [Publisher(id=i + 1, name=f"publisher {i}") for i in range(authors)]
    tags = [Tag(id=i + 1, name=f"tag {i}") for i in range(5)]
    session.add_all(publishers + tags)
    book_id = 0
    for a in range(authors):
        author = Author(id=a + 1, name=f"author {a}")
        for _ in range(books_per_author):
            book_id += 1
            author.books.append(
                Book(
                    id=book_id,
                    title=f"book {book_id}",
                    publisher=publishers[book_id % authors],
                    tags=[tags[book_id % 5], tags[(book_id + 1) % 5]],
                    chapters=[Chapter(id=book_id * 10 + c, title=f"chapter {c}") for c in range(2)],
                )
            )
        session.add(author)
    session.commit()


def create_schema(engine: sa.Engine) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)


def seeded(engine: sa.Engine, *, authors: int = 10, books_per_author: int = 3) -> sa.Engine:
    """`engine` with a fresh schema and the `seed()` data."""
    create_schema(engine)
    with Session(engine) as session:
        seed(session, authors=authors, books_per_author=books_per_author)
    return engine
