"""Instruction counts: what querywatch adds per statement and per N+1 request, load-independent.

Wall-clock ratios on a shared 2-core machine move by several percent from run to run. This
benchmark counts CPU instructions instead, with valgrind's callgrind (`apt-get install valgrind`),
which gives the same count for the same code whatever else the machine is doing. Each scenario
runs twice per side (a short and a long loop) and the difference is divided by the extra loop
iterations, so interpreter start-up and imports cancel out. In-memory SQLite, so that the
database's own work does not dilute the figure.

    python benchmarks/instructions.py [--scenario core-repeated core-distinct orm-n-plus-one]

Scenarios:
- `core-repeated`: `conn.execute(select ... where id = :i)` with `i % 100` inside one `watch()`
  (micro_core.py's loop: most executions repeat an earlier one, so duplicate tracking runs).
- `core-distinct`: the same with a new `i` every time.
- `orm-n-plus-one`: one unit of work per "request": 20 authors, then `author.books` lazy-loaded
  for each (21 statements and one N+1 finding per request).
- `asgi-one`, `asgi-n-plus-one`: the whole stack per HTTP request - a FastAPI app called over
  raw ASGI, with and without `querywatch.fastapi.setup(app, engine)` (middleware, detection,
  pool tracking, Prometheus metrics, structlog): one `session.get()`, or the 21-statement N+1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile

import sqlalchemy as sa
from _common import Author, Base, request, seed
from sqlalchemy.orm import Session

SCENARIOS = ("core-repeated", "core-distinct", "orm-n-plus-one", "asgi-one", "asgi-n-plus-one")
#: (short, long) loop lengths per scenario.
LOOPS = {
    "core-repeated": (500, 2500),
    "core-distinct": (500, 2500),
    "orm-n-plus-one": (20, 100),
    "asgi-one": (50, 250),
    "asgi-n-plus-one": (20, 100),
}


def asgi(engine: sa.Engine, side: str, path: str, n: int) -> None:
    """`n` GET requests to `path` of a FastAPI app (querywatch set up when `side` is `watch`)."""
    import asyncio

    from fastapi import FastAPI
    from prometheus_client import CollectorRegistry

    import querywatch.fastapi

    app = FastAPI()

    @app.get("/one")
    def one() -> dict[str, str]:
        with Session(engine) as session:
            author = session.get(Author, 1)
            return {"name": author.name if author else ""}

    @app.get("/n-plus-one")
    def n_plus_one() -> dict[str, int]:
        return {"books": request(engine)}

    if side == "watch":
        querywatch.fastapi.setup(app, engine, registry=CollectorRegistry())

    async def call() -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": b"", "headers": [], "client": ("127.0.0.1", 1), "server": None,
        }  # fmt: skip

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, object]) -> None:
            pass

        for _ in range(n):
            await app(scope, receive, send)

    asyncio.run(call())


def child(scenario: str, side: str, n: int) -> None:
    """Run one loop (under callgrind); `side` is `bare` or `watch`."""
    import structlog

    import querywatch

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    engine = sa.create_engine(
        "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False}
    )
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(session)
    if scenario.startswith("asgi-"):
        asgi(engine, side, "/one" if scenario == "asgi-one" else "/n-plus-one", n)
        return
    if side == "watch":
        querywatch.instrument(engine)

    def unit() -> contextlib.AbstractContextManager[object]:
        return querywatch.watch("bench") if side == "watch" else contextlib.nullcontext()

    if scenario == "orm-n-plus-one":
        for _ in range(n):
            with unit(), Session(engine) as session:
                for author in session.scalars(sa.select(Author)).all():
                    len(author.books)
        return
    table = Author.__table__
    stmt = sa.select(table.c.id, table.c.name).where(table.c.id == sa.bindparam("i"))
    repeated = scenario == "core-repeated"
    with engine.connect() as conn, unit():
        for i in range(n):
            conn.execute(stmt, {"i": i % 100 if repeated else i}).all()


def _pythonpath() -> str:
    """This checkout on the path; a PYTHONPATH given by the caller comes first:
    `PYTHONPATH=<other checkout>` measures it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH", ""), root]))


def count(scenario: str, side: str, n: int) -> int:
    """Instructions of one child run, as callgrind counts them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": _pythonpath()}
        result = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--child",
                scenario,
                side,
                str(n),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--child", nargs=3, metavar=("SCENARIO", "SIDE", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        scenario, side, n = args.child
        child(scenario, side, int(n))
        return
    print(f"{'scenario':<16} {'per':<10} {'bare':>12} {'querywatch':>12} {'added':>10} {'%':>7}")
    for scenario in args.scenario:
        short, long = LOOPS[scenario]
        per = {}
        for side in ("bare", "watch"):
            # One run outside valgrind first: it writes the bytecode caches of whatever was
            # edited since, which the counted runs would otherwise compile unevenly (the first
            # of them paying for it all).
            subprocess.run(
                [sys.executable, __file__, "--child", scenario, side, "1"],
                env={**os.environ, "PYTHONPATH": _pythonpath()},
                check=True,
                capture_output=True,
            )
            per[side] = (count(scenario, side, long) - count(scenario, side, short)) / (
                long - short
            )
        added = per["watch"] - per["bare"]
        unit = "statement" if scenario.startswith("core-") else "request"
        print(
            f"{scenario:<16} {unit:<10} {per['bare']:>12,.0f} {per['watch']:>12,.0f} "
            f"{added:>10,.0f} {added / per['bare'] * 100:>6.1f}%"
        )


if __name__ == "__main__":
    main()
