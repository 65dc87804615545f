"""Privacy: secret values (a password hash, an e-mail, a token, a card number), bound as
parameters or pasted into SQL as literals, never leave the process through logs, metrics,
reports or exceptions, for every finding kind; and `Settings.log_parameters`, the one opt-in
that lets bounded examples of bound values into findings."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.orm.exc import DetachedInstanceError

import querywatch
from querywatch import NPlusOneDetected, Report, Settings, fingerprint
from querywatch import _metrics as metrics_module
from querywatch.fastapi import setup
from querywatch.findings import MAX_PARAMETER_EXAMPLES, MAX_PARAMETER_LENGTH
from tests.conftest import PSYCOPG_URL, Logs, require_postgres
from tests.web_apps import asgi_client

PASSWORD_HASH = "$2b$12$SECRETHASHxyzAbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcd"
EMAIL = "alice.secret@example.com"
TOKEN = "tok_SECRETTOKEN_9f8e7d6c5b4a"
CARD = 4929731452816903
#: What must never show up anywhere outside the process (compared case-insensitively: shapes
#: are lower-cased). Every secret below contains one of these.
MARKERS = ("SECRETHASH", "alice.secret", "SECRETTOKEN", str(CARD), "DOLLARSECRET", "ESCSECRET")
ACCOUNTS = 6  # more than the default n_plus_one_threshold (5)
#: Findings and events the exercise produces: every kind querywatch reports.
FINDING_KINDS = {
    "n_plus_one",
    "duplicate_query",
    "bulk_write",
    "lazy_load_after_close",
    "connection_leak",
    "stale_allowlist_entry",
}
SETTINGS = Settings(log_requests="all", allowlist=("Nobody.nothing",), report_stale_allowlist=True)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "privacy_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(200), unique=True)
    password_hash: Mapped[str] = mapped_column(sa.String(200))
    token: Mapped[str] = mapped_column(sa.String(200))
    card: Mapped[int] = mapped_column(sa.BigInteger)
    # Keyed by the e-mail: each lazy load binds a secret.
    logins: Mapped[list[Login]] = relationship(order_by="Login.id")


class Login(Base):
    __tablename__ = "privacy_logins"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_email: Mapped[str] = mapped_column(sa.ForeignKey("privacy_accounts.email"))
    note: Mapped[str] = mapped_column(sa.String(200))


def _email(i: int) -> str:
    return EMAIL if i == 1 else f"alice.secret+{i}@example.com"


def _create(engine: sa.Engine) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for i in range(1, ACCOUNTS + 1):
            session.add(
                Account(
                    id=i,
                    email=_email(i),
                    password_hash=f"{PASSWORD_HASH}{i}",
                    token=f"{TOKEN}{i}",
                    card=CARD + i,
                )
            )
        session.commit()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An instrumented engine with the accounts table and a one-connection pool that gives up
    after 50 ms (so a leaked connection makes the next checkout time out): a SQLite file, then
    PostgreSQL (psycopg)."""
    pool = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.05}
    if request.param == "postgresql":
        require_postgres()
        created = sa.create_engine(PSYCOPG_URL, **pool)
    else:
        created = sa.create_engine(f"sqlite:///{tmp_path / 'privacy.db'}", **pool)
    _create(created)
    querywatch.instrument(created)
    yield created
    querywatch.uninstrument(created)
    Base.metadata.drop_all(created)
    created.dispose()


def exercise(engine: sa.Engine) -> sa.Connection:
    """Run the secrets through every finding kind; returns the connection it leaks (the caller
    closes it once the unit of work has ended)."""
    with Session(engine) as session:
        accounts = session.scalars(sa.select(Account).order_by(Account.id)).all()
        for account in accounts:
            assert account.logins == []  # lazy-load N+1, bound: each account's e-mail
        for account in accounts:  # statement-loop N+1, bound: e-mail and password hash
            session.execute(
                sa.text("SELECT id FROM privacy_accounts WHERE email = :e AND password_hash = :h"),
                {"e": account.email, "h": account.password_hash},
            )
        for i in range(1, ACCOUNTS + 1):  # statement-loop N+1, literals in the SQL
            found = session.execute(
                sa.text(
                    f"SELECT id FROM privacy_accounts WHERE email = '{_email(i)}' AND "
                    f"token = '{TOKEN}{i}' AND card = {CARD + i} AND id = :i"
                ),
                {"i": i},
            ).scalar()
            assert found == i  # the literal secrets really matched
        if engine.dialect.name == "postgresql":
            for i in range(ACCOUNTS):  # dollar-quoted and E'' literals, bound `%(i)s`
                session.execute(
                    sa.text(
                        f"SELECT id FROM privacy_accounts WHERE email = $q$DOLLARSECRET{i}$q$ "
                        f"OR email = $$DOLLARSECRET{i}$$ OR email = E'it\\'s ESCSECRET {i}' "
                        f"OR id = :i"
                    ),
                    {"i": i},
                )
        for _ in range(3):  # duplicate query, bound: the token
            session.execute(
                sa.text("SELECT id FROM privacy_accounts WHERE token = :t"), {"t": f"{TOKEN}1"}
            )
        for _ in range(2):  # duplicate query, literal: the password hash
            session.execute(
                sa.text(f"SELECT id FROM privacy_accounts WHERE password_hash = '{PASSWORD_HASH}1'")
            )
        for i in range(1, ACCOUNTS + 1):  # bulk write, bound: a new token per account
            session.execute(
                sa.text("UPDATE privacy_accounts SET token = :t WHERE id = :i"),
                {"t": f"{TOKEN}-new-{i}", "i": i},
            )
        for i in range(ACCOUNTS):  # bulk write, literals: the e-mail and the password hash
            session.execute(
                sa.text(
                    f"INSERT INTO privacy_logins (id, account_email, note) "
                    f"VALUES (:i, '{EMAIL}', '{PASSWORD_HASH}')"
                ),
                {"i": 100 + i},
            )
        session.commit()
        assert [a.password_hash for a in accounts]  # expired after commit: reloaded one by one
    with Session(engine) as short:
        detached = short.get(Account, 1)
    assert detached is not None
    with pytest.raises(DetachedInstanceError):
        _ = detached.logins  # lazy load after close
    leaked = engine.connect()  # connection leak: still out when the unit ends
    leaked.execute(sa.text(f"SELECT id FROM privacy_accounts WHERE email = '{EMAIL}'"))
    with pytest.raises(PoolTimeoutError):
        engine.connect()  # pool timeout: the only connection is the leaked one
    return leaked


def _kinds(report: Report) -> set[str]:
    return {finding.kind for finding in report.findings}


def report_text(report: Report) -> str:
    """Everything a report exposes: every property, every finding's fields, line and repr."""
    parts = [repr(report), repr(report.findings_to_report())]
    for name, attribute in vars(Report).items():
        if isinstance(attribute, property):
            parts.append(repr(getattr(report, name)))
    for finding in report.findings:
        fields = finding.as_log_fields(max_sql_length=10**6)
        parts += [repr(finding), finding.describe(), repr(fields), json.dumps(fields)]
    return "\n".join(parts)


def assert_no_secret(text: str) -> None:
    lowered = text.lower()
    leaked = [marker for marker in MARKERS if marker.lower() in lowered]
    assert not leaked, f"secrets leaked: {leaked}"


@dataclass
class Run:
    reports: list[Report]
    logs: Logs
    metrics: str


@pytest.fixture
def watched(engine: sa.Engine, logs: Logs, reports: list[Report]) -> Run:
    """The exercise run in a `watch()` unit; the metrics of a fresh registry scraped after."""
    registry = CollectorRegistry()
    metrics_module.install(registry)
    with querywatch.watch("privacy-job", settings=SETTINGS) as report:
        leaked = exercise(engine)
    leaked.close()
    assert _kinds(report) == FINDING_KINDS
    assert report.pool.timeouts == 1
    return Run(reports, logs, generate_latest(registry).decode())


@pytest.fixture
async def requested(engine: sa.Engine, logs: Logs, reports: list[Report]) -> Run:
    """The exercise run by an endpoint of a FastAPI app wired with `setup()`; /metrics scraped
    over HTTP and from the registry."""
    registry = CollectorRegistry()
    app = FastAPI()
    leaked: list[sa.Connection] = []

    @app.get("/accounts/audit")
    def audit() -> dict[str, bool]:
        leaked.append(exercise(engine))
        return {"ok": True}

    setup(app, engine, settings=SETTINGS, registry=registry)
    async with asgi_client(app) as client:
        assert (await client.get("/accounts/audit", params={"page": 1})).status_code == 200
        scraped = (await client.get("/metrics")).text
    for connection in leaked:
        connection.close()
    (report,) = [r for r in reports if r.http is not None]
    assert _kinds(report) == FINDING_KINDS
    assert "querywatch_n_plus_one_total" in scraped
    return Run(reports, logs, scraped + generate_latest(registry).decode())


def test_watch_logs_no_secret(watched: Run) -> None:
    """No structlog line of a `watch()` unit (every finding event, the pool timeout) holds a
    secret."""
    events = {event["event"] for event in watched.logs.events()}
    assert {f"querywatch.{kind}" for kind in FINDING_KINDS} | {"querywatch.pool_timeout"} <= events
    assert_no_secret(watched.logs.text)


def test_watch_report_holds_no_secret(watched: Run) -> None:
    """No property of a `watch()` unit's report, nor any finding's fields, line or repr, holds
    a secret."""
    assert watched.reports
    for report in watched.reports:
        assert_no_secret(report_text(report))


def test_watch_metrics_hold_no_secret(watched: Run) -> None:
    """No metric sample recorded for a `watch()` unit holds a secret."""
    assert 'querywatch_n_plus_one_total{route="<job>"}' in watched.metrics
    assert_no_secret(watched.metrics)


def test_request_logs_no_secret(requested: Run) -> None:
    """No structlog line of a request (finding events, pool timeout, `querywatch.request`)
    holds a secret."""
    events = {event["event"] for event in requested.logs.events()}
    assert {"querywatch.request", "querywatch.pool_timeout", "querywatch.n_plus_one"} <= events
    assert_no_secret(requested.logs.text)


def test_request_report_holds_no_secret(requested: Run) -> None:
    """No property of a request's report, nor any finding's fields, line or repr, holds a
    secret."""
    for report in requested.reports:
        assert_no_secret(report_text(report))


def test_request_metrics_hold_no_secret(requested: Run) -> None:
    """Neither /metrics nor the registry holds a secret after a request with every finding."""
    assert_no_secret(requested.metrics)


def test_raise_mode_message_holds_no_secret(engine: sa.Engine) -> None:
    """`NPlusOneDetected`, its message and its findings hold no secret."""
    leaked: list[sa.Connection] = []
    with (
        pytest.raises(NPlusOneDetected) as raised,
        querywatch.watch("privacy-raise", settings=SETTINGS.replace(mode="raise")),
    ):
        leaked.append(exercise(engine))
    for connection in leaked:
        connection.close()
    assert {f.kind for f in raised.value.findings} == FINDING_KINDS
    assert_no_secret(str(raised.value))
    assert_no_secret(repr(raised.value.findings))


async def test_async_drivers_leak_no_bound_or_literal_secret(
    any_async_engine: AsyncEngine, logs: Logs, reports: list[Report]
) -> None:
    """aiosqlite (`?`) and asyncpg (`$1`): loops with bound and literal secrets log and report
    no secret."""
    async with any_async_engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    dollar = any_async_engine.dialect.name == "postgresql"
    try:
        async with querywatch.watch("privacy-async") as report, any_async_engine.connect() as c:
            for i in range(ACCOUNTS):
                await c.execute(
                    sa.text("SELECT id FROM privacy_accounts WHERE email = :e AND token = :t"),
                    {"e": _email(i), "t": f"{TOKEN}{i}"},
                )
                literal = f"$$DOLLARSECRET{i}$$" if dollar else f"'{PASSWORD_HASH}{i}'"
                await c.execute(
                    sa.text(
                        f"SELECT id FROM privacy_accounts WHERE password_hash = {literal} "
                        f"OR card = {CARD} OR id = :i"
                    ),
                    {"i": i},
                )
    finally:
        async with any_async_engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
    assert len(report.n_plus_one) == 2
    assert_no_secret(logs.text)
    assert_no_secret(report_text(report))


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT * FROM u WHERE email = '{EMAIL}'",
        f"SELECT * FROM u WHERE email = 'o''{EMAIL}'",
        f"SELECT * FROM u WHERE email = N'{EMAIL}' OR h = X'{CARD}'",
        f"SELECT * FROM u WHERE email = U&'{EMAIL}'",
        f"SELECT * FROM u WHERE h = E'it\\'s {PASSWORD_HASH}' AND t = '{TOKEN}'",
        f"SELECT * FROM u WHERE h = e'\\\\' OR t = '{TOKEN}'",
        f"SELECT * FROM u WHERE h = $${PASSWORD_HASH}$$",
        f"SELECT * FROM u WHERE h = $secret$ it's {PASSWORD_HASH} $ $$ $secret$ AND id = 1",
        f"SELECT * FROM u WHERE card = {CARD}",
        f"SELECT * FROM u WHERE card = -{CARD}.5e3",
        "SELECT * FROM u WHERE card = 4929_7314_5281_6903",
        f"SELECT * FROM u WHERE card = {hex(CARD)} OR card = 0o{CARD:o} OR card = 0b{CARD:b}",
        f"SELECT * FROM u WHERE card IN ({CARD}, {CARD + 1})",
        f"SELECT * FROM u /* {EMAIL} */ WHERE t = 1 -- {TOKEN}",
        f"SELECT * FROM u WHERE email = '{EMAIL}",
    ],
    ids=[
        "quoted",
        "doubled-quote",
        "national-and-hex",
        "unicode",
        "e-escaped",
        "e-escaped-backslash",
        "dollar",
        "dollar-tagged",
        "number",
        "signed-exponent",
        "underscores",
        "hex-octal-binary",
        "in-list",
        "comments",
        "unterminated",
    ],
)
def test_fingerprint_strips_every_literal_form(sql: str) -> None:
    """Quoted, escaped (E''), dollar-quoted, national, hex and Unicode strings, numbers in every
    notation, comments and an unterminated string: none of their content is in the shape."""
    shape = fingerprint(sql)
    assert_no_secret(shape)
    assert not re.search(r"\d\d", shape), shape  # no part of a number either


def test_dollar_quotes_leave_identifiers_and_placeholders_alone() -> None:
    """`$1` placeholders and identifiers containing `$` are not mistaken for dollar quotes."""
    shape = fingerprint("SELECT a$b$c FROM t WHERE x = $1 AND y = $2::int AND z = $t$v$t$")
    assert shape == "select a$b$c from t where x = ? and y = ? and z = ?"


# -- Settings.log_parameters ---------------------------------------------------------------

OPTED_IN = Settings(log_parameters=True, n_plus_one_threshold=3)


def test_findings_carry_no_parameters_by_default(engine: sa.Engine) -> None:
    """Without `log_parameters`, findings have empty `parameters` and no such log field."""
    with querywatch.watch("default") as report, engine.connect() as conn:
        for i in range(ACCOUNTS):
            conn.execute(
                sa.text("SELECT id FROM privacy_accounts WHERE email = :e"), {"e": _email(i)}
            )
    (finding,) = report.n_plus_one
    assert finding.parameters == ()
    assert "parameters" not in finding.as_log_fields()


def test_statement_loop_carries_parameter_examples(engine: sa.Engine) -> None:
    """Opted in, a statement-loop N+1 carries the first distinct parameter sets."""
    with querywatch.watch("loop", settings=OPTED_IN) as report, engine.connect() as conn:
        for i in range(ACCOUNTS):
            conn.execute(
                sa.text("SELECT id FROM privacy_accounts WHERE email = :e"), {"e": _email(i)}
            )
    (finding,) = report.n_plus_one
    assert len(finding.parameters) == MAX_PARAMETER_EXAMPLES
    assert [EMAIL in example for example in finding.parameters] == [False, True, False]
    assert "alice.secret+2@example.com" in finding.parameters[2]


def test_lazy_load_carries_parameter_examples(engine: sa.Engine) -> None:
    """Opted in, a lazy-load N+1 carries examples of the loads' bound parameters."""
    with querywatch.watch("lazy", settings=OPTED_IN) as report, Session(engine) as session:
        for account in session.scalars(sa.select(Account).order_by(Account.id)):
            assert account.logins == []
    (finding,) = report.n_plus_one
    assert finding.relationship == "Account.logins"
    assert len(finding.parameters) == MAX_PARAMETER_EXAMPLES
    assert EMAIL in finding.parameters[0]


def test_bulk_write_carries_parameter_examples(engine: sa.Engine) -> None:
    """Opted in, a bulk-write finding carries examples of the rows written."""
    with querywatch.watch("bulk", settings=OPTED_IN) as report, engine.begin() as conn:
        for i in range(ACCOUNTS):
            conn.execute(
                sa.text("UPDATE privacy_accounts SET token = :t WHERE id = :i"),
                {"t": f"{TOKEN}-{i}", "i": i},
            )
    (finding,) = report.bulk_writes
    assert len(finding.parameters) == MAX_PARAMETER_EXAMPLES
    assert f"{TOKEN}-0" in finding.parameters[0]


def test_duplicate_carries_the_repeated_parameters(engine: sa.Engine) -> None:
    """Opted in, a duplicate-query finding carries the parameter set that was repeated, not the
    ones that ran once."""
    settings = Settings(log_parameters=True)
    with querywatch.watch("dup", settings=settings) as report, engine.connect() as conn:
        for token in ("once-a", "twice", "once-b", "twice"):
            conn.execute(sa.text("SELECT id FROM privacy_accounts WHERE token = :t"), {"t": token})
    (finding,) = report.duplicates
    assert len(finding.parameters) == 1
    assert "twice" in finding.parameters[0]


def test_parameter_examples_reach_the_log_event(engine: sa.Engine, logs: Logs) -> None:
    """Opted in, the finding's log event has a `parameters` list with the bound values."""
    with querywatch.watch("logged", settings=OPTED_IN), engine.connect() as conn:
        for i in range(ACCOUNTS):
            conn.execute(
                sa.text("SELECT id FROM privacy_accounts WHERE email = :e"), {"e": _email(i)}
            )
    (event,) = [e for e in logs.events() if e["event"] == "querywatch.n_plus_one"]
    assert len(event["parameters"]) == MAX_PARAMETER_EXAMPLES
    assert EMAIL in json.dumps(event)


def test_parameter_examples_are_bounded(engine: sa.Engine, logs: Logs) -> None:
    """Megabyte values and hundreds of parameter sets give at most three examples of at most
    200 characters each, and a small log event."""
    huge = "x" * 1_000_000
    statement = sa.text("SELECT id FROM privacy_accounts WHERE email = :e AND :b IS NOT NULL")
    with querywatch.watch("bounded", settings=OPTED_IN) as report, engine.connect() as conn:
        for i in range(300):
            value = f"{huge}{i}" if i < 5 else str(i)
            conn.execute(statement, {"e": value, "b": value.encode()})
    (finding,) = report.n_plus_one
    assert len(finding.parameters) == MAX_PARAMETER_EXAMPLES
    assert all(len(example) <= MAX_PARAMETER_LENGTH for example in finding.parameters)
    assert max(len(line) for line in logs.text.splitlines()) < 4_000


def test_only_opted_in_units_carry_parameters(engine: sa.Engine) -> None:
    """A unit without `log_parameters` nested in one with it reports no values; the enclosing
    unit's own findings carry them."""
    opted_out = OPTED_IN.replace(log_parameters=False)
    with (
        querywatch.watch("outer", settings=OPTED_IN) as outer,
        engine.connect() as conn,
        querywatch.watch("inner", settings=opted_out) as inner,
    ):
        for i in range(ACCOUNTS):
            conn.execute(
                sa.text("SELECT id FROM privacy_accounts WHERE email = :e"), {"e": _email(i)}
            )
    assert inner.n_plus_one[0].parameters == ()
    assert len(outer.n_plus_one[0].parameters) == MAX_PARAMETER_EXAMPLES
