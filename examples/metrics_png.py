"""Draw docs/img/metrics.png: querywatch's key metrics over a real traffic run of the shop.

    .venv/bin/python examples/metrics_png.py            # about 35 s; writes docs/img/metrics.png

Serves the example shop (`examples/shop`, a scratch SQLite file, querywatch mounted as in the
demo) with uvicorn on a free loopback port, drives `shop.traffic` against it - first every
endpoint, mistakes and fixes, then only the fixed endpoints (as after a deploy of the fixes) -
and scrapes `/metrics` over HTTP every `--interval` seconds while it runs. The plot (matplotlib,
Agg backend) shows what a Grafana dashboard built on these metrics shows: requests per second,
statements per request, N+1 findings per second, and the mean wait for a pooled connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DEFAULT_OUTPUT = ROOT / "docs" / "img" / "metrics.png"

#: The endpoints that are the fixes: what is left of a round once the mistakes are gone.
FIXED_PATHS = frozenset(
    (
        "/customers",
        "/orders/recent",
        "/orders/1",
        "/quote",
        "/customers/1/summary",
        "/reports/revenue",
        "/healthz",
    )
)


@dataclass(frozen=True)
class Scrape:
    """One scrape of `/metrics`: seconds since the run started, and the sums we plot."""

    seconds: float
    requests: float  # querywatch_request_db_statements_count, every route
    statements: float  # querywatch_request_db_statements_sum, every route
    n_plus_one: float  # querywatch_n_plus_one_total, every route
    pool_waits: dict[str, tuple[float, float]]  # pool -> (wait count, wait sum in seconds)
    pool_timeouts: float  # querywatch_db_pool_checkout_timeouts_total, every pool


def parse_scrape(seconds: float, text: str) -> Scrape:
    """The sums of one exposition (Prometheus text format) that the plot needs."""
    from prometheus_client.parser import text_string_to_metric_families

    requests = statements = n_plus_one = timeouts = 0.0
    waits: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "querywatch_request_db_statements_count":
                requests += sample.value
            elif sample.name == "querywatch_request_db_statements_sum":
                statements += sample.value
            elif sample.name == "querywatch_n_plus_one_total":
                n_plus_one += sample.value
            elif sample.name == "querywatch_db_pool_checkout_timeouts_total":
                timeouts += sample.value
            elif sample.name == "querywatch_db_pool_wait_seconds_count":
                waits.setdefault(sample.labels["pool"], [0.0, 0.0])[0] = sample.value
            elif sample.name == "querywatch_db_pool_wait_seconds_sum":
                waits.setdefault(sample.labels["pool"], [0.0, 0.0])[1] = sample.value
    return Scrape(
        seconds,
        requests,
        statements,
        n_plus_one,
        {pool: (count, total) for pool, (count, total) in waits.items()},
        timeouts,
    )


def plot(scrapes: list[Scrape], output: Path, *, fix_at: float | None = None) -> None:
    """Four panels of rates between consecutive scrapes, written to `output` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times: list[float] = []
    rps: list[float] = []
    per_request: list[float] = []
    n_plus_one: list[float] = []
    waits: dict[str, list[float]] = {}
    for before, after in itertools.pairwise(scrapes):
        span = after.seconds - before.seconds
        if span <= 0:
            continue
        requests = after.requests - before.requests
        times.append(after.seconds)
        rps.append(requests / span)
        per_request.append((after.statements - before.statements) / requests if requests else 0)
        n_plus_one.append((after.n_plus_one - before.n_plus_one) / span)
        for pool, (count, total) in after.pool_waits.items():
            old_count, old_total = before.pool_waits.get(pool, (0.0, 0.0))
            checkouts = count - old_count
            mean = (total - old_total) / checkouts * 1000 if checkouts else 0.0
            waits.setdefault(pool, [0.0] * (len(times) - 1)).append(mean)
        for series in waits.values():
            series.extend([0.0] * (len(times) - len(series)))

    figure, axes = plt.subplots(2, 2, figsize=(11, 6.2), sharex=True, layout="constrained")
    panels = (
        (axes[0][0], "Requests per second", "req/s", {"all routes": rps}),
        (axes[0][1], "SQL statements per request", "statements", {"all routes": per_request}),
        (axes[1][0], "N+1 findings per second", "findings/s", {"all routes": n_plus_one}),
        (axes[1][1], "Mean wait for a pooled connection", "ms", waits),
    )
    for axis, title, unit, series in panels:
        for label, values in sorted(series.items()):
            axis.plot(times, values, label=label, linewidth=1.6)
        axis.set_title(title, fontsize=11)
        axis.set_ylabel(unit)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        if fix_at is not None:
            axis.axvline(fix_at, color="grey", linestyle="--", linewidth=1)
        if len(series) > 1:
            axis.legend(title="pool", fontsize=9)
    for axis in axes[1]:
        axis.set_xlabel("seconds since the traffic started")
    if fix_at is not None:
        axes[0][0].annotate(
            "fixes deployed", (fix_at, 0), xytext=(4, 6), textcoords="offset points", fontsize=9
        )
    total = scrapes[-1]
    figure.suptitle(
        f"querywatch on the example shop: {total.requests:.0f} requests, "
        f"{len(scrapes)} scrapes of /metrics, {total.pool_timeouts:.0f} pool timeouts",
        fontsize=12,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)


def run(*, rounds: int, fixed_rounds: int, interval: float, output: Path) -> int:
    """Serve the shop, drive traffic while scraping, plot. Returns the exit status."""
    sys.path.insert(0, str(EXAMPLES))
    import httpx
    import structlog
    from prometheus_client import CollectorRegistry
    from shop.app import create_app
    from shop.serving import serve_in_background
    from shop.traffic import ROUND, drive

    # Findings are the point of the run, not of its output: keep the terminal quiet.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    fixed_round = tuple(call for call in ROUND if call[1].split("?")[0] in FIXED_PATHS)
    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(f"sqlite:///{scratch}/shop.db", registry=CollectorRegistry())
        served = serve_in_background(app)
        if served is None:
            print("metrics_png: the shop did not start", file=sys.stderr)
            return 1
        base_url = served.base_url

        async def traffic_and_scrapes() -> tuple[list[Scrape], float]:
            scrapes: list[Scrape] = []
            started = time.monotonic()
            done = asyncio.Event()
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

                async def scrape_until_done() -> None:
                    while True:
                        text = (await client.get("/metrics")).text
                        scrapes.append(parse_scrape(time.monotonic() - started, text))
                        if done.is_set():
                            return
                        # the scrape interval: a pause, as a Prometheus server takes between
                        # scrapes, or the end of the traffic, whichever comes first
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(done.wait(), interval)

                scraper = asyncio.create_task(scrape_until_done())
                await drive(client, rounds=rounds)
                fix_at = time.monotonic() - started
                await drive(client, rounds=fixed_rounds, calls_per_round=fixed_round)
                done.set()
                await scraper
            return scrapes, fix_at

        try:
            scrapes, fix_at = asyncio.run(traffic_and_scrapes())
        finally:
            served.stop()
    if len(scrapes) < 3:
        print(f"metrics_png: only {len(scrapes)} scrapes; raise --rounds", file=sys.stderr)
        return 1
    plot(scrapes, output, fix_at=fix_at if fixed_rounds else None)
    print(f"metrics_png: {len(scrapes)} scrapes, {scrapes[-1].requests:.0f} requests -> {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds of every endpoint")
    parser.add_argument(
        "--fixed-rounds", type=int, default=400, help="then rounds of the fixed endpoints only"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    return run(
        rounds=args.rounds,
        fixed_rounds=args.fixed_rounds,
        interval=args.interval,
        output=args.output,
    )


if __name__ == "__main__":
    raise SystemExit(main())
