import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import querywatch


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list["Book"]] = relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


engine = sa.create_engine("sqlite:///books.db")
Base.metadata.drop_all(engine)
Base.metadata.create_all(engine)
with Session(engine) as seed:
    seed.add_all(
        Author(name=f"author {a}", books=[Book(title=f"book {a}.{b}") for b in range(3)])
        for a in range(1, 11)
    )
    seed.commit()
querywatch.instrument(engine)  # once, at start-up
