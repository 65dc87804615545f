"""Settings: defaults, environment parsing, and errors that name the setting."""

from __future__ import annotations

import pytest

from querywatch import ConfigError, Settings


def test_defaults_are_production_safe() -> None:
    """Out of the box: log mode, threshold 5, no parameter values, findings-only request logs."""
    s = Settings()
    assert (s.mode, s.n_plus_one_threshold, s.log_parameters, s.log_requests) == (
        "log",
        5,
        False,
        "findings",
    )


def test_from_env_reads_querywatch_variables() -> None:
    """Each field maps to QUERYWATCH_<NAME>, parsed by type."""
    s = Settings.from_env(
        {
            "QUERYWATCH_MODE": "raise",
            "QUERYWATCH_N_PLUS_ONE_THRESHOLD": "3",
            "QUERYWATCH_LOG_SAMPLE_RATE": "0.5",
            "QUERYWATCH_SERVER_TIMING": "yes",
            "QUERYWATCH_ALLOWLIST": "Author.books, app/legacy/*",
            "UNRELATED": "x",
        }
    )
    assert (s.mode, s.n_plus_one_threshold, s.log_sample_rate, s.server_timing) == (
        "raise",
        3,
        0.5,
        True,
    )
    assert s.allowlist == ("Author.books", "app/legacy/*")


def test_from_env_overrides_win() -> None:
    """Keyword overrides take precedence over the environment."""
    assert Settings.from_env({"QUERYWATCH_MODE": "raise"}, mode="warn").mode == "warn"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"QUERYWATCH_MODE": "explode"}, "mode"),
        ({"QUERYWATCH_N_PLUS_ONE_THRESHOLD": "five"}, "n_plus_one_threshold"),
        ({"QUERYWATCH_N_PLUS_ONE_THRESHOLD": "1"}, "n_plus_one_threshold"),
        ({"QUERYWATCH_ENABLED": "maybe"}, "enabled"),
        ({"QUERYWATCH_LOG_SAMPLE_RATE": "2"}, "log_sample_rate"),
        ({"QUERYWATCH_LOG_REQUESTS": "some"}, "log_requests"),
        ({"QUERYWATCH_LOG_FINDING_INTERVAL": "-1"}, "log_finding_interval"),
        ({"QUERYWATCH_LOG_FINDING_INTERVAL": "inf"}, "log_finding_interval"),
        ({"QUERYWATCH_REQUEST_ID_HEADER": "X Request"}, "request_id_header"),
    ],
)
def test_invalid_environment_fails_naming_the_setting(env: dict[str, str], setting: str) -> None:
    """A bad value fails at start-up, and the message names the setting."""
    with pytest.raises(ConfigError, match=f"'{setting}'") as info:
        Settings.from_env(env)
    assert info.value.setting == setting


def test_invalid_constructor_value_fails_naming_the_setting() -> None:
    """Programmatic settings are validated the same way."""
    with pytest.raises(ConfigError, match="'max_queries': must be at least 0, got -1"):
        Settings(max_queries=-1)


def test_allowlist_must_not_be_a_bare_string() -> None:
    """A string where a sequence belongs would allowlist single characters: rejected."""
    with pytest.raises(ConfigError, match="'allowlist'"):
        Settings(allowlist="Author.books")  # type: ignore[arg-type]


def test_settings_are_frozen() -> None:
    """Settings cannot change under a running application."""
    with pytest.raises(AttributeError):
        Settings().mode = "raise"  # type: ignore[misc]
