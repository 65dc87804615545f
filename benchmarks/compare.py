"""querywatch side by side with the tools people use today, in one run: the README's table.

Runs the team's overhead harness (a FastAPI + SQLAlchemy app with `/one`, `/list-eager` and
`/list-nplus1`, each configuration in its own pinned worker process, rounds interleaved so the
ratios hold while the machine's speed drifts) and prints, per tool, the ratio to the bare app
for `/one` and `/list-nplus1` on every backend, and the µs each adds per Core statement, then
checks querywatch against its targets.

    python benchmarks/compare.py              # every peer; SQLite and PostgreSQL, sync and async
    python benchmarks/compare.py --configs bare,fsm,querywatch --backends sqlite --quick
    python benchmarks/compare.py --from-json /tmp/overhead-sqlalchemy-2.0.58.json   # re-print a run

The harness lives outside this repository (the team's shared checkout, `../shared/bench` beside
it by default; `--harness` or `QUERYWATCH_BENCH_HARNESS` point elsewhere) with its own virtualenv
of the peers (`bash <harness>/setup.sh` creates `/tmp/peers-venv`); `--install` puts this
checkout of querywatch into that virtualenv first. Differences under ~250 µs per request are
within a shared 2-core machine's noise: compare ratios from one run, never across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = "bare,otel,sentry,queryspy,fsm,querywatch"
#: The targets of querywatch's performance work (issue 17).
MAX_RATIO = 1.05
MAX_US_PER_STATEMENT = 2.0
MAX_SHARE_OF_BARE = 0.08
LABELS = {
    "fsm": "fastapi-sqlalchemy-monitor (counts only)",
    "queryspy": "queryspy (detects)",
    "otel": "OpenTelemetry",
    "otel_asgi": "OpenTelemetry + ASGI",
    "sentry": "sentry-sdk",
    "nplus1": "nplus1",
    "prom": "prometheus-fastapi-instrumentator (HTTP only)",
    "querywatch": "**querywatch**",
}


def default_harness() -> Path:
    configured = os.environ.get("QUERYWATCH_BENCH_HARNESS")
    return Path(configured) if configured else ROOT.parent / "shared" / "bench"


def run_harness(args: argparse.Namespace) -> dict[str, Any]:
    harness = Path(args.harness)
    if not (harness / "overhead" / "bench.py").is_file():
        sys.exit(
            f"no overhead harness at {harness} (expected overhead/bench.py there); "
            "give its folder with --harness or QUERYWATCH_BENCH_HARNESS"
        )
    python = args.python
    if not Path(python).exists():
        sys.exit(f"{python} does not exist: run `bash {harness}/setup.sh` first, or give --python")
    if args.install:
        subprocess.run([python, "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "overhead.json"
        command = [python, "-m", "overhead.bench", "--configs", args.configs, "--json", str(out)]
        command += ["--backends", args.backends, "--modes", args.modes]
        if args.quick:
            command.append("--quick")
        if args.rounds:
            command += ["--rounds", str(args.rounds)]
        print("+ " + " ".join(command), file=sys.stderr)
        subprocess.run(command, cwd=harness, check=True, stdout=sys.stderr)
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def table(result: dict[str, Any]) -> tuple[str, list[str]]:
    """The markdown table, and querywatch's misses of its targets."""
    rows = result["requests"]
    micro = {m["config"]: m for m in result.get("micro", [])}
    columns = list(dict.fromkeys((r["backend"], r["mode"]) for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows if r["config"] != "bare"))
    ratio = {(r["backend"], r["mode"], r["config"], r["endpoint"]): r["ratio"] for r in rows}
    header = " | ".join(f"{b} {m}" for b, m in columns)
    lines = [
        f"Ratio to bare for `/one` · `/list-nplus1` ({result['meta']['sqlalchemy']}, "
        f"{result['meta']['cpus']} CPUs):",
        "",
        f"| config | {header} | µs added per Core statement |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    misses: list[str] = []
    bare_us = micro.get("bare", {}).get("us_per_stmt")
    for config in configs:
        cells = []
        for backend, mode in columns:
            one = ratio.get((backend, mode, config, "/one"))
            n1 = ratio.get((backend, mode, config, "/list-nplus1"))
            cells.append(f"{one:.2f} · {n1:.2f}" if one and n1 else "n/a")
            if config == "querywatch":
                for endpoint, value in (("/one", one), ("/list-nplus1", n1)):
                    if value is not None and value > MAX_RATIO:
                        misses.append(f"{backend} {mode} {endpoint}: x{value:.2f} > {MAX_RATIO}")
        added = micro.get(config, {}).get("overhead_us_per_stmt")
        cells.append(f"{added:+.1f}" if added is not None else "n/a")
        if config == "querywatch" and added is not None and bare_us:
            limit = max(MAX_US_PER_STATEMENT, MAX_SHARE_OF_BARE * bare_us)
            if added > limit:
                misses.append(f"Core statement: +{added:.1f} µs > {limit:.1f} µs")
        lines.append(f"| {LABELS.get(config, config)} | " + " | ".join(cells) + " |")
    if bare_us:
        lines += ["", f"Bare Core statement: {bare_us:.1f} µs on this run."]
    return "\n".join(lines), misses


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--harness", default=str(default_harness()))
    parser.add_argument("--python", default="/tmp/peers-venv/bin/python")
    parser.add_argument("--configs", default=PEERS)
    parser.add_argument("--backends", default="sqlite,pg")
    parser.add_argument("--modes", default="sync,async")
    parser.add_argument("--rounds", type=int, default=0, help="the harness's default when 0")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--install", action="store_true", help="pip install -e this checkout")
    parser.add_argument("--from-json", help="print the table of an earlier run's JSON instead")
    args = parser.parse_args()
    result = json.loads(Path(args.from_json).read_text()) if args.from_json else run_harness(args)
    text, misses = table(result)
    print(text)
    if any(r["config"] == "querywatch" for r in result["requests"]):
        print()
        if misses:
            print("querywatch misses its targets: " + "; ".join(misses))
        else:
            print(
                f"querywatch meets its targets: ratio <= {MAX_RATIO} on every endpoint and "
                f"backend, <= {MAX_US_PER_STATEMENT} µs (or {MAX_SHARE_OF_BARE:.0%} of bare) "
                "per Core statement."
            )


if __name__ == "__main__":
    main()
