"""Fuzz `fingerprint()`: a million generated inputs, no exception, linear time, bounded output.

1. Generated inputs (default 1,000,000, fixed seed) through `fingerprint_and_operation` and
   `fingerprint`, each with one of the dialects in turn (None, sqlite, postgresql, mysql,
   mssql, oracle, and the quoting modes of postgresql and mysql): SQL-ish token soups,
   unbalanced quotes, open `--` and `/*` comments, dollar quotes, E'' escapes, huge IN lists
   (one of 1,000,000 literals and one of 1,000,000 placeholders are always among them), random
   bytes, invalid UTF-8, lone surrogates, NUL bytes, emoji, very long identifiers, deeply
   nested parentheses, and objects that are not text (bytes, bytearray, memoryview, None, ints,
   floats, SQLAlchemy `TextClause`, an object whose `__str__` raises). Every result must be a
   string no longer than MAX_INPUT plus the truncation marker, with a known operation; and a
   canary word inside a well-formed string literal of the input's dialect (standard, E'',
   dollar-quoted, MySQL backslash-escaped '...' and "...", Oracle q'[...]'), next to comments
   and quoted names holding quotes, must never reach the shape.
2. Linear time: nanoseconds per character at 1k to 10M characters for adversarial patterns,
   as shipped. Fails when the cost per character of the largest input processed whole
   (MAX_INPUT = 100,000 characters) exceeds `--max-ratio` times its cost at 10k characters, when
   a 10M-character input costs more than 3 times a 100k one (beyond MAX_INPUT the input is cut),
   or when a cut input's shape lacks the truncation marker. The same check runs for every
   dialect's tokenizer (a second table: the ratio per pattern and dialect). `--uncut` also
   prints the first table with the cut lifted (information only: where the tokenizer itself
   stops being linear).

The fingerprint cache is switched off (`configure_cache(0)`): every call does the real work.
Prints a summary; exits 1 on any failure.

    python benchmarks/fuzz_fingerprint.py [--inputs 1000000] [--seed 8] [--max-ratio 5]
        [--sizes 1000,10000,100000,1000000,10000000] [--uncut] [--dialects all|none|a,b]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections import Counter
from collections.abc import Callable

import sqlalchemy as sa

from querywatch import fingerprinting
from querywatch.fingerprinting import (
    MAX_INPUT,
    TRUNCATED_MARKER,
    cache_len,
    configure_cache,
    fingerprint,
    fingerprint_and_operation,
)

OPERATIONS = {"SELECT", "INSERT", "UPDATE", "DELETE", "OTHER"}
#: Every input is fingerprinted with one of these in turn (None: the conservative tokenizer).
DIALECTS: list[str | None] = [
    None,
    "sqlite",
    "postgresql",
    "postgresql/backslash_escapes",
    "mysql",
    "mysql/ansi_quotes",
    "mysql/no_backslash_escapes",
    "mssql",
    "oracle",
]
MAX_SHAPE = MAX_INPUT + len(TRUNCATED_MARKER)
CANARY = "QWCANARYZZ"

TOKENS = [
    "SELECT", "select", "FROM", "t", "WHERE", "a.id", "=", "IN", "in", "VALUES", "INSERT INTO",
    "UPDATE", "SET", "DELETE", "WITH", "AS", "(", ")", ",", ";", " ", "  ", "\n", "\t", "\r\n",
    "'", "''", '"', '""', "`", "--", "/*", "*/", "#", "$$", "$a$", "$tag$", "$1", "$2::int",
    "?", ":name", "::", "%s", "%(p)s", "__[POSTCOMPILE_id_1]", "e'", "E'", "N'", "X'", "B'",
    "\\", "\\'", "1", "-2", "3.5e3", "0x1f", "1_000", ".5", "NULL", "\x00", "\ud800", "\udcff",
    "\u0130", "\U0001f600", "\u200b", "\ufeff", "\u2028", "ß", "Σ", "-- ", "#>", "#>>", "U&'",
    "q'[", "]'", "q'!", "nq'", "[", "]", "]]", "\\\"", "/**/",
]  # fmt: skip
ALPHABET = "abcxyz_$'\"`-/*#\\()?:,;% \n\t0123456789eE.\x00\u0130\U0001f600\udc80"


# -- generators: each returns one input ------------------------------------------------------


def soup(rng: random.Random) -> object:
    return "".join(rng.choices(TOKENS, k=rng.randint(0, 80)))


def char_noise(rng: random.Random) -> object:
    return "".join(rng.choices(ALPHABET, k=rng.randint(0, 300)))


def unbalanced(rng: random.Random) -> object:
    opener = rng.choice(["'", '"', "`", "/*", "--", "$$", "$q$", "E'", "e'\\", "#", "(", "U&'"])
    body = "".join(rng.choices(TOKENS, k=rng.randint(0, 30)))
    return f"SELECT a FROM t WHERE b = {opener}{body}"


def comments(rng: random.Random) -> object:
    parts = []
    for _ in range(rng.randint(1, 20)):
        parts.append(rng.choice(["SELECT 1", "FROM t", "WHERE x = ?", "a", ","]))
        parts.append(rng.choice(["/* c */", "/*", "*/", "-- c\n", "--", "# c\n", "/* /* */", " "]))
    return "".join(parts)


def dollar(rng: random.Random) -> object:
    tag = rng.choice(["", "a", "body", "_x1", "é"])
    body = "".join(rng.choices(TOKENS, k=rng.randint(0, 30)))
    close = rng.choice([f"${tag}$", "", "$", f"${tag}", "$other$"])
    return f"DO ${tag}${body}{close} ; SELECT $1, $2"


def in_list(rng: random.Random) -> object:
    items = rng.choices(
        ["?", "%s", "1", "-2.5", "'x'", "$1", ":p", "%(id_1_1)s"], k=rng.randint(1, 60)
    )
    comma = rng.choice([",", ", ", " , ", ",\n"])
    return f"SELECT * FROM t WHERE id IN ({comma.join(items)}{rng.choice([')', '', ',', ', x)'])}"


def huge_in(rng: random.Random) -> object:
    n = rng.choice([500, 5_000, rng.randint(1, 50_000)])
    item = rng.choice(["?", "%s", "1", "'x'", "$1", ":p"])
    return f"SELECT * FROM t WHERE id IN ({', '.join([item] * n)})"


def raw_bytes(rng: random.Random) -> object:
    return rng.randbytes(rng.randint(0, 400))


def invalid_utf8(rng: random.Random) -> object:
    text = "".join(rng.choices(TOKENS[:40], k=rng.randint(0, 30))).encode()
    junk = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80\x80", b"\0"])
    at = rng.randint(0, len(text))
    data = text[:at] + junk * rng.randint(1, 5) + text[at:]
    return rng.choice([data, bytearray(data), memoryview(data)])


def surrogates(rng: random.Random) -> object:
    text = "".join(rng.choices(TOKENS[:40], k=rng.randint(0, 30))).encode()
    garbled = text + rng.randbytes(rng.randint(1, 20))
    return garbled.decode("utf-8", "surrogateescape")


def emoji_and_nul(rng: random.Random) -> object:
    pieces = ["SELECT", " ", "'", "\U0001f600", "\x00", "\u0130", "a", "?", "\U0010ffff", "\x7f"]
    return "".join(rng.choices(pieces, k=rng.randint(0, 200)))


def long_identifier(rng: random.Random) -> object:
    name = rng.choice("aé_Σ") * rng.randint(1_000, 120_000)
    return rng.choice([f"SELECT {name} FROM t", f'SELECT "{name}" FROM t', f"SELECT `{name}"])


def nested(rng: random.Random) -> object:
    depth = rng.randint(1, 50_000)
    core = rng.choice(["?", "1", "'x'", "SELECT 1", "in (?, ?)", ""])
    close = ")" * rng.choice([depth, depth // 2, 0])
    return "SELECT " + "(" * depth + core + close


def not_text(rng: random.Random) -> object:
    choice = rng.randint(0, 7)
    if choice == 0:
        return None
    if choice == 1:
        return rng.randint(-(10**30), 10**30)
    if choice == 2:
        return rng.choice([float("nan"), float("inf"), -0.0, rng.random()])
    if choice == 3:
        return sa.text(f"SELECT :x, {rng.randint(0, 10**6)} FROM t WHERE y = 'z'")
    if choice == 4:
        return [rng.random(), "SELECT 1"]
    if choice == 5:
        return _Unprintable()
    if choice == 6:
        return rng.randbytes(40)
    return object()


def _standard(content: str, quote: str = "'") -> str:
    return quote + content.replace(quote, quote * 2) + quote


def _backslashed(content: str, quote: str = "'") -> str:
    return quote + content.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote


#: The literals each dialect reads, as functions of their content.
_STANDARD_FORMS: list[Callable[[str], str]] = [_standard, lambda c: "N" + _standard(c)]
_E = [lambda c: "E" + _backslashed(c), lambda c: "$$" + c.replace("$", "") + "$$"]
LITERALS: dict[str | None, list[Callable[[str], str]]] = {
    None: [*_STANDARD_FORMS, *_E, lambda c: "X" + _standard(c), lambda c: "B" + _standard(c)],
    "sqlite": [_standard, lambda c: "X" + _standard(c)],
    "postgresql": [*_STANDARD_FORMS, *_E, lambda c: "U&" + _standard(c)],
    "postgresql/backslash_escapes": [_backslashed, *_E],
    "mysql": [_backslashed, lambda c: _backslashed(c, '"'), lambda c: "N" + _backslashed(c)],
    "mysql/ansi_quotes": [_backslashed, lambda c: "_utf8mb4" + _backslashed(c)],
    "mysql/no_backslash_escapes": [_standard, lambda c: _standard(c, '"')],
    "mssql": _STANDARD_FORMS,
    "oracle": [
        *_STANDARD_FORMS,
        lambda c: "q'[" + c.replace("]", "") + "]'",
        lambda c: "nQ'!" + c.replace("!", "") + "!'",
    ],
}
#: Comments, operators and quoted names each dialect reads, whose quotes open no string.
_PG_DECOYS = ["/* a /* it's */ it's */", "-- it's\n", '"it\'s"', "# 1", "#>> '{a}'", "$1"]
DECOYS: dict[str | None, list[str]] = {
    None: ["/* it's */", "-- it's\n", "# it's\n", '"it\'s"', "`it's`", "#>> '{a}'"],
    "sqlite": ["/* it's */", "-- it's\n", "[it's]", '"it\'s"', "`it's`"],
    "postgresql": _PG_DECOYS,
    "postgresql/backslash_escapes": _PG_DECOYS,
    "mysql": ["/* it's */", "-- it's\n", "# it's\n", "#>> it's\n", "`it's`", "--1"],
    "mysql/ansi_quotes": ["/* it's */", "-- it's\n", "# it's\n", "`it's`", '"it\'s"'],
    "mysql/no_backslash_escapes": ["/* it's */", "--\tit's\n", "# it's\n", "`it\\'s`"],
    "mssql": ["/* a /* it's */ it's */", "-- it's\n", "[it's]", "[a]]'b]", "#tmp"],
    "oracle": ["/* it's */", "-- it's\n", '"it\'s"', "a#b"],
}


def canary(rng: random.Random, dialect: str | None = None) -> object:
    """A well-formed literal of `dialect` around the canary, in a well-formed statement of
    that dialect with quotes in its comments and quoted names."""
    junk = "".join(rng.choices("ab '\\$\n-/*#\"`[]!", k=rng.randint(0, 12)))
    content = junk[: rng.randint(0, len(junk))] + CANARY + junk
    literal = rng.choice(LITERALS[dialect])(content)
    decoys = DECOYS[dialect]
    where = rng.choice(["a = {}", "a IN ({}, {})", "f({})", "a LIKE {} ESCAPE '!'"])
    return (
        f"SELECT a {rng.choice(decoys)} FROM t WHERE {rng.choice(decoys)} "
        + where.format(literal, literal)
        + f" AND b = ? {rng.choice(decoys)}"
    )


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")


GENERATORS: list[tuple[Callable[[random.Random], object], int]] = [
    (soup, 30),
    (char_noise, 15),
    (unbalanced, 10),
    (comments, 8),
    (dollar, 6),
    (canary, 10),
    (in_list, 4),
    (raw_bytes, 5),
    (invalid_utf8, 5),
    (surrogates, 4),
    (emoji_and_nul, 4),
    (not_text, 3),
]
#: Large inputs (up to 400,000 characters), drawn in turn once every `LARGE_EVERY` inputs.
LARGE: tuple[Callable[[random.Random], object], ...] = (huge_in, long_identifier, nested)
LARGE_EVERY = 1_000


def fixed_inputs() -> list[tuple[str, object]]:
    """The inputs every run includes: the largest of each kind."""
    million = 1_000_000
    select_in = "SELECT * FROM t WHERE id IN ({})"
    return [
        ("in_list_1M_literals", select_in.format(", ".join(map(str, range(million))))),
        ("in_list_1M_placeholders", select_in.format(", ".join(["?"] * million))),
        ("statement_10MB", "SELECT a FROM t WHERE b = ? " * (10_000_000 // 28)),
        ("parens_1M", "SELECT " + "(" * million),
        ("identifier_1M", "SELECT " + "a" * million),
        ("nul_1M", "\x00" * million),
        ("surrogates_100k", "\udc80" * 100_000),
        ("emoji_1M", "\U0001f600" * million),
        ("bytes_1M", bytes(range(256)) * 4_000),
        ("empty", ""),
    ]  # fmt: skip


# -- part 1: generated inputs --------------------------------------------------------------


def check_one(
    value: object, which: int, failures: list[str], label: str, dialect: str | None = None
) -> int:
    """Fingerprint `value` in `dialect`; record any failure. Returns 1 for a canary leak, else 0."""
    label = f"{label} [{dialect}]"
    try:
        if which:
            shape, operation = fingerprint_and_operation(value, dialect=dialect)
        else:
            shape = fingerprint(value, dialect=dialect)
            operation = fingerprinting.operation_of(shape)
    except Exception as exc:
        failures.append(f"{label}: {type(exc).__name__}: {exc} for {_short(value)}")
        return 0
    if not isinstance(shape, str) or operation not in OPERATIONS:
        failures.append(f"{label}: bad result {shape!r:.80} / {operation!r} for {_short(value)}")
    elif len(shape) > MAX_SHAPE:
        failures.append(f"{label}: shape of {len(shape)} characters for {_short(value)}")
    if isinstance(shape, str) and CANARY.lower() in shape.lower():
        failures.append(f"{label}: literal leaked into {shape!r:.120} from {_short(value)}")
        return 1
    return 0


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 160 else f"{text[:150]}... ({len(text)} chars)"


def run_inputs(
    n: int, seed: int, fixed: list[tuple[str, object]], dialects: list[str | None]
) -> tuple[list[str], Counter[str], float, tuple[float, str]]:
    rng = random.Random(seed)
    failures: list[str] = []
    counts: Counter[str] = Counter()
    slowest = (0.0, "")
    funcs = [g for g, _ in GENERATORS]
    weights = [w for _, w in GENERATORS]
    started = time.perf_counter()
    for i in range(n):
        dialect = dialects[i % len(dialects)]
        if i < len(fixed):
            label, value = fixed[i]
        elif i % LARGE_EVERY == LARGE_EVERY // 2:
            generator = LARGE[(i // LARGE_EVERY) % len(LARGE)]
            label, value = generator.__name__, generator(rng)
        else:
            generator = rng.choices(funcs, weights)[0]
            label = generator.__name__
            value = canary(rng, dialect) if generator is canary else generator(rng)
        counts[label] += 1
        t0 = time.perf_counter()
        check_one(value, (i // len(dialects)) & 1, failures, label, dialect)
        took = time.perf_counter() - t0
        if took > slowest[0]:
            slowest = (took, f"{label} ({len(fingerprinting._as_text(value)):,} characters)")
        if len(failures) > 50:
            failures.append("... stopping after 50 failures")
            break
    return failures, counts, time.perf_counter() - started, slowest


# -- part 2: linear time ---------------------------------------------------------------------

PATTERNS = {
    "'": "'",
    "/*": "/*",
    "--\\n": "--\n",
    "a:b ": "a:b ",
    "$1::int ": "$1::int ",
    "IN (?, ": "IN (?, ",
    '"x': '"x',
    "`": "`",
    "\\'": "\\'",
    "E'\\'": "E'\\'",
    "e'x\\": "e'x\\",
    "$$": "$$",
    "$a$ ": "$a$ ",
    "$a$a": "$a$a",
    "0x1 ": "0x1 ",
    "1_": "1_",
    "(((": "(((",
    "(?, ?), ": "(?, ?), ",
    "#\\n": "#\n",
    "space": " ",
    "U+0130": "\u0130",
    "emoji": "\U0001f600",
    "NUL": "\x00",
    "soup": "".join(random.Random(1).choices(TOKENS, k=400)),
}
#: Patterns aimed at one dialect's tokenizer (timed, with PATTERNS, in every dialect).
DIALECT_PATTERNS = {
    "'\\": "'\\",
    '"x\\"': '"x\\"',
    "-- ": "-- ",
    "--1": "--1",
    "/* /* */": "/* /* */",
    "/**/*": "/**/*",
    "/*/*/*": "/*/*/*",
    "[a]]": "[a]]",
    "[": "[",
    "q'[": "q'[",
    "q'!": "q'!",
    "U&'": "U&'",
    "#>": "#>",
}


def seconds_per_call(sql: str, dialect: str | None = None) -> float:
    """Best of 5 batches, each long enough to time (the cache is off, and strings this long
    are never cached anyway); one call when a call takes longer than 0.3 s."""
    t0 = time.perf_counter()
    fingerprint(sql, dialect=dialect)
    once = time.perf_counter() - t0
    per_batch = max(1, int(0.02 / max(once, 1e-7)))
    batches = 5 if once < 0.3 else 0
    best = once
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fingerprint(sql, dialect=dialect)
        best = min(best, (time.perf_counter() - t0) / per_batch)
    return best


def timing_table(sizes: list[int], capped: bool, max_ratio: float) -> list[str]:
    """Print ns per character per pattern and size; return the failures. Uncut (MAX_INPUT
    lifted), the table is information only: it shows where linearity ends beyond the cut."""
    failures = []
    saved = fingerprinting.MAX_INPUT
    if not capped:
        fingerprinting.MAX_INPUT = max(sizes) + 1  # the tokenizer itself, uncut
    title = (
        f"as shipped (MAX_INPUT = {MAX_INPUT:,})"
        if capped
        else "tokenizer uncut (MAX_INPUT lifted; information only, production cuts at MAX_INPUT)"
    )
    print(f"\nns per character, {title}")
    header = " | ".join(f"{size:>10,}" for size in sizes)
    flat_header = f" {sizes[-1] // 1_000_000}M/100k call |" if capped else ""
    print(f"| {'pattern':<10} | {header} | ratio |{flat_header} verdict |")
    rule = "-------|" + ("---------------|" if capped else "")
    print(f"|{'-' * 12}|" + "|".join("-" * 12 for _ in sizes) + f"|{rule}---------|")
    gc.disable()
    try:
        for name, unit in PATTERNS.items():
            per_char = []
            for size in sizes:
                sql = (unit * (size // len(unit) + 1))[:size]
                per_char.append(seconds_per_call(sql) / size)
                if capped and size > MAX_INPUT and not fingerprint(sql).endswith(TRUNCATED_MARKER):
                    failures.append(f"{name}: {size:,} characters without the truncation marker")
            base = per_char[sizes.index(10_000)] if 10_000 in sizes else per_char[0]
            flat_cell = ""
            if capped:
                # Beyond the cut, the cost per call stays flat: compare the largest real work.
                top = [s for s in sizes if s <= MAX_INPUT][-1]
                ratio = per_char[sizes.index(top)] / base
                flat = (per_char[-1] * sizes[-1]) / (per_char[sizes.index(top)] * top)
                ok = ratio <= max_ratio and flat <= 3
                flat_cell = f" {flat:13.2f} |"
                if flat > 3:
                    failures.append(f"{name}: {sizes[-1]:,} chars cost {flat:.1f}x {top:,} chars")
                if ratio > max_ratio:
                    failures.append(f"{name}: per-character cost grew {ratio:.1f}x by {top:,}")
            else:
                ratio = per_char[-1] / base
                ok = ratio <= max_ratio
            verdict = ("ok" if ok else "FAIL") if capped else ("flat" if ok else "grows")
            cells = " | ".join(f"{p * 1e9:>10.1f}" for p in per_char)
            print(f"| {name:<10} | {cells} | {ratio:5.2f} |{flat_cell} {verdict:<7} |")
    finally:
        gc.enable()
        fingerprinting.MAX_INPUT = saved
    return failures


def dialect_table(dialects: list[str | None], max_ratio: float) -> list[str]:
    """Per pattern and dialect, the growth of the cost per character from 10k to 100k
    characters, and of the cost per call from 100k to 10M (cut at MAX_INPUT): print the
    table, return the failures."""
    failures = []
    small, top, huge = 10_000, MAX_INPUT, 10_000_000
    names = ["none" if d is None else d.replace("postgresql", "pg") for d in dialects]
    print(f"\nper dialect: cost per character {top // 1000}k/{small // 1000}k "
          f"(and per call {huge // 1_000_000}M/{top // 1000}k when above 3)")  # fmt: skip
    print("| pattern    | " + " | ".join(f"{n:>9.9}" for n in names) + " |")
    print(f"|{'-' * 12}|" + "|".join("-" * 11 for _ in names) + "|")
    gc.disable()
    try:
        for name, unit in {**PATTERNS, **DIALECT_PATTERNS}.items():
            texts = [(unit * (size // len(unit) + 1))[:size] for size in (small, top, huge)]
            cells = []
            for dialect in dialects:
                costs = [seconds_per_call(text, dialect) for text in texts]
                ratio = (costs[1] / top) / (costs[0] / small)
                flat = costs[2] / costs[1]
                if not fingerprint(texts[2], dialect=dialect).endswith(TRUNCATED_MARKER):
                    failures.append(f"{name} [{dialect}]: cut input without the marker")
                if ratio > max_ratio:
                    failures.append(f"{name} [{dialect}]: per-character cost grew {ratio:.1f}x")
                if flat > 3:
                    failures.append(f"{name} [{dialect}]: 10M chars cost {flat:.1f}x 100k")
                mark = "" if ratio <= max_ratio and flat <= 3 else " FAIL"
                cells.append(f"{ratio:.2f}" + (f"/{flat:.1f}" if flat > 3 else "") + mark)
            print(f"| {name:<10} | " + " | ".join(f"{c:>9}" for c in cells) + " |")
    finally:
        gc.enable()
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--max-ratio", type=float, default=5.0)
    parser.add_argument("--sizes", default="1000,10000,100000,1000000,10000000")
    parser.add_argument(
        "--uncut", action="store_true", help="also time the tokenizer with MAX_INPUT lifted"
    )
    parser.add_argument(
        "--dialects",
        default="all",
        help="'all', 'none' (the conservative tokenizer only) or a comma-separated list",
    )
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.dialects == "all":
        dialects = DIALECTS
    elif args.dialects == "none":
        dialects = [None]
    else:
        dialects = [None if d == "none" else d for d in args.dialects.split(",")]
    configure_cache(0)  # every call does the work

    python = sys.version.split()[0]
    shown = ", ".join(str(d) for d in dialects)
    print(f"fuzz_fingerprint: {args.inputs:,} inputs, seed {args.seed}, Python {python}")
    print(f"dialects, in turn: {shown}")
    fixed = fixed_inputs()
    failures, counts, seconds, slowest = run_inputs(args.inputs, args.seed, fixed, dialects)
    print(f"\n{sum(counts.values()):,} inputs in {seconds:.1f} s "
          f"({seconds / max(1, sum(counts.values())) * 1e6:.1f} µs each); "
          f"slowest single input {slowest[0] * 1e3:.1f} ms: {slowest[1]}")  # fmt: skip
    print("inputs per generator: " + ", ".join(f"{k} {v:,}" for k, v in counts.most_common()))

    # The largest inputs, exactly.
    million_in = fingerprint(fixed[0][1])
    expected = "select * from t where id in (?)" + TRUNCATED_MARKER
    if million_in != expected:
        failures.append(f"1M-item IN list: {million_in!r:.200}, expected {expected!r}")
    print(f"1,000,000-item IN list -> {million_in!r}")
    saved = fingerprinting.MAX_INPUT
    fingerprinting.MAX_INPUT = 10**8
    try:
        uncut = fingerprint(fixed[1][1])
    finally:
        fingerprinting.MAX_INPUT = saved
    if uncut != "select * from t where id in (?)":
        failures.append(f"1M-item IN list, uncut: {uncut!r:.200}")
    print(f"1,000,000-item IN list, MAX_INPUT lifted -> {uncut!r}")

    failures += timing_table(sizes, capped=True, max_ratio=args.max_ratio)
    if args.uncut:
        timing_table(sizes, capped=False, max_ratio=args.max_ratio)
    if dialects != [None]:
        failures += dialect_table(dialects, args.max_ratio)
    if cache_len():
        failures.append(f"the fingerprint cache holds {cache_len()} entries with size 0")

    print()
    if failures:
        print(f"FAIL: {len(failures)} problem(s)")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print(
        f"PASS: {sum(counts.values()):,} inputs in {len(dialects)} dialect(s), no exception, "
        f"no literal leaked, every shape <= {MAX_SHAPE:,} characters; cost per character flat "
        f"within {args.max_ratio}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
