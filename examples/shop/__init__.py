"""A small FastAPI shop that makes the classic SQLAlchemy mistakes on purpose, next to their fixes.

`shop.app` is the sync variant (plain `def` endpoints, `Session`), `shop.async_app` the async one
(`async def` endpoints, `AsyncSession`). Both are audited by querywatch; each endpoint's docstring
says what querywatch reports for it. `shop.traffic` calls every endpoint once.
"""
