"""A small traffic driver: calls every endpoint of the shop, mistakes and fixes, in order.

    python -m shop.traffic --base-url http://127.0.0.1:8000 --rounds 3

`drive()` takes any `httpx.AsyncClient`, so tests run it over the ASGI transport.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

import httpx

PRODUCT_IDS = "1,2,3,4,5,6,7,8"

#: (method, path, expected status) of one round. The leaky report leaks both connections of
#: the `reports` pool, so the third day times out waiting for one; `/reports/release` frees them.
ROUND: tuple[tuple[str, str, int], ...] = (
    ("GET", "/customers/n-plus-one", 200),
    ("GET", "/customers", 200),
    ("GET", "/orders/recent/lazy", 200),
    ("GET", "/orders/recent", 200),
    ("GET", "/orders/1/detached", 500),
    ("GET", "/orders/1", 200),
    ("GET", f"/quote/get-loop?product_ids={PRODUCT_IDS}", 200),
    ("GET", f"/quote?product_ids={PRODUCT_IDS}", 200),
    ("GET", "/customers/1/summary/duplicate", 200),
    ("GET", "/customers/1/summary", 200),
    ("GET", "/reports/revenue?since=2024-01-01", 200),
    ("GET", "/reports/revenue/leaky?since=2024-01-01", 200),
    ("GET", "/reports/revenue/leaky?since=2024-01-02", 200),
    ("GET", "/reports/revenue/leaky?since=2024-01-03", 500),
    ("POST", "/reports/release", 200),
    ("GET", "/healthz", 200),
)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    status: int
    expected: int
    seconds: float

    def __str__(self) -> str:
        mark = "" if self.status == self.expected else f"  (expected {self.expected})"
        return f"{self.method} {self.path} -> {self.status} in {self.seconds * 1000:.0f} ms{mark}"


#: One round against the async variant (`shop.async_app`).
ASYNC_ROUND: tuple[tuple[str, str, int], ...] = (
    ("GET", "/customers/lazy", 500),
    ("GET", "/customers/awaitable-attrs", 200),
    ("GET", "/customers", 200),
    ("GET", f"/quote/get-loop?product_ids={PRODUCT_IDS}", 200),
    ("GET", f"/quote?product_ids={PRODUCT_IDS}", 200),
    ("GET", "/healthz", 200),
)


async def drive(
    client: httpx.AsyncClient,
    *,
    rounds: int = 1,
    echo: bool = False,
    calls_per_round: tuple[tuple[str, str, int], ...] = ROUND,
) -> list[Call]:
    """Run `rounds` rounds of `calls_per_round` through `client`, one request at a time."""
    calls: list[Call] = []
    for _ in range(rounds):
        for method, path, expected in calls_per_round:
            started = time.perf_counter()
            response = await client.request(method, path)
            call = Call(method, path, response.status_code, expected, time.perf_counter() - started)
            calls.append(call)
            if echo:
                print(f"traffic: {call}", flush=True)
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--async", dest="use_async", action="store_true",
                        help="drive the async variant (shop.async_app)")  # fmt: skip
    args = parser.parse_args(argv)
    calls_per_round = ASYNC_ROUND if args.use_async else ROUND

    async def run() -> list[Call]:
        async with httpx.AsyncClient(base_url=args.base_url, timeout=30) as client:
            return await drive(
                client, rounds=args.rounds, echo=True, calls_per_round=calls_per_round
            )

    calls = asyncio.run(run())
    unexpected = [call for call in calls if call.status != call.expected]
    return 1 if unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
