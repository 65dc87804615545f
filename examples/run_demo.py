"""The querywatch demo in one command, on a fresh clone with nothing but Python:

    python3 examples/run_demo.py            # set up, run the shop, drive traffic, print, exit
    python3 examples/run_demo.py --serve    # ... then keep serving, with the console (Ctrl-C)

Creates (or reuses) `.venv` at the repository root and installs querywatch with the example's
requirements into it (the same install as the Dockerfile), then starts the example shop
(`examples/shop`, SQLite file `examples/shop.db`, or `DATABASE_URL`) with uvicorn on a free
loopback port, calls every endpoint once, and prints querywatch's log lines and a few lines of
`/metrics`. Exits 1 when querywatch reported no finding or an endpoint answered unexpectedly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
VENV = ROOT / ".venv"
#: Set before re-running inside .venv, so a broken install cannot loop.
_BOOTSTRAPPED = "QUERYWATCH_DEMO_BOOTSTRAPPED"
NEEDED = ("querywatch", "fastapi", "uvicorn", "httpx", "structlog", "prometheus_client")
#: Metric families shown at the end of the demo.
SHOWN_METRICS = (
    "querywatch_n_plus_one_total",
    "querywatch_duplicate_queries_total",
    "querywatch_lazy_loads_total",
    "querywatch_lazy_loads_after_close_total",
    "querywatch_db_pool_leaked_connections_total",
    "querywatch_db_pool_checkout_timeouts_total",
    "querywatch_request_db_statements_sum",
)


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _missing_deps(python: Path | str) -> str | None:
    """None when `python` imports everything the demo needs, else the import error."""
    check = f"import {', '.join(NEEDED)}"
    result = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    if result.returncode == 0:
        return None
    return (result.stderr.strip().splitlines() or ["import failed"])[-1]


def bootstrap() -> None:
    """Re-run this script inside `.venv` (created and installed when needed), unless the
    running interpreter already has everything."""
    if sys.prefix != sys.base_prefix and _missing_deps(sys.executable) is None:
        return
    if os.environ.get(_BOOTSTRAPPED):
        sys.exit(
            f"demo: {sys.executable} still cannot run the demo: {_missing_deps(sys.executable)}"
        )
    python = _venv_python()
    if not python.exists():
        print(f"demo: creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    if _missing_deps(python) is not None:
        print("demo: installing querywatch and the example's requirements into .venv", flush=True)
        install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*install, "-e", str(ROOT), "-r", str(EXAMPLES / "requirements.txt")],
                       check=True)  # fmt: skip
    os.environ[_BOOTSTRAPPED] = "1"
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the querywatch example shop and show findings."
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port to serve on (default: a free one)"
    )
    parser.add_argument("--serve", action="store_true", help="keep serving after the traffic")
    parser.add_argument("--async", dest="use_async", action="store_true",
                        help="run the async variant (shop.async_app)")  # fmt: skip
    args = parser.parse_args(argv)
    bootstrap()
    sys.path.insert(0, str(EXAMPLES))
    return run(port=args.port, serve=args.serve, use_async=args.use_async)


def run(*, port: int, serve: bool, use_async: bool) -> int:
    import asyncio

    import httpx
    from shop.logs import configure_logging
    from shop.serving import serve_in_background
    from shop.traffic import ASYNC_ROUND, ROUND, Call, drive

    import querywatch

    configure_logging()
    if use_async:
        from shop.async_app import create_app
    else:
        from shop.app import create_app
    calls_per_round = ASYNC_ROUND if use_async else ROUND
    findings: list[str] = []
    querywatch.add_reporter(lambda report: findings.extend(f.kind for f in report.findings))
    settings = querywatch.Settings.from_env()
    if serve:  # the live console, for a developer at this machine (loopback only)
        settings = settings.replace(console=True)
    app = create_app(settings=settings)
    served = serve_in_background(app, port=port)
    if served is None:
        print("demo: the server did not start", file=sys.stderr)
        return 1
    base_url = served.base_url
    print(f"demo: the shop is serving on {base_url}; querywatch's log lines follow", flush=True)

    async def traffic() -> tuple[list[Call], str]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            calls = await drive(client, echo=True, calls_per_round=calls_per_round)
            metrics = (await client.get("/metrics")).text
        return calls, metrics

    calls, metrics = asyncio.run(traffic())
    unexpected = [call for call in calls if call.status != call.expected]
    lines = metrics.splitlines()
    shown = [
        line
        for name in SHOWN_METRICS
        for line in lines
        if line.startswith(name + "{") and not line.endswith(" 0.0")
    ]
    print(f"\ndemo: a few lines of {base_url}/metrics:")
    print("\n".join(shown[:16]))
    print(f"\ndemo: querywatch reported {len(findings)} findings in {len(calls)} requests "
          f"({', '.join(sorted(set(findings))) or 'none'})", flush=True)  # fmt: skip
    if serve:
        print(f"demo: still serving on {base_url} (/docs, /metrics); Ctrl-C to stop", flush=True)
        print(f"demo: querywatch console: {base_url}{settings.console_path}/", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            served.wait()
    served.stop()
    return 0 if findings and not unexpected else 1


if __name__ == "__main__":
    raise SystemExit(main())
