"""Pure rules: exit statuses, request parsing, run specs and configuration."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator import config
from orchestrator.api.schemas import JobCreate
from orchestrator.transports.base import RunSpec, signal_name
from orchestrator.transports.ssh import status_result


@pytest.mark.parametrize(
    ("status", "exit_code", "signal"),
    [
        (0, 0, None),
        (1, 1, None),
        (128, 128, None),
        (137, None, "SIGKILL"),
        (143, None, "SIGTERM"),
        (255, 255, None),
    ],
)
def test_status_result_mapping(
    status: int, exit_code: int | None, signal: str | None
) -> None:
    result = status_result(status)
    assert result.exit_code == exit_code
    assert result.signal == signal
    assert result.error is None


def test_signal_names_normalised() -> None:
    assert signal_name("TERM") == "SIGTERM"
    assert signal_name("sigusr1") == "SIGUSR1"
    assert signal_name(9) == "SIGKILL"


def test_params_list_and_object() -> None:
    listed = JobCreate(scriptId="3", params=["a", 2, None, True])
    keyed = JobCreate(scriptId=3, params={"b": "x", "a": "y"})
    assert listed.scriptId == 3
    assert listed.param_list() == ["a", "2", "", "true"]
    assert keyed.param_list() == ["x", "y"]


def test_bad_fields_rejected() -> None:
    with pytest.raises(ValidationError):
        JobCreate(command="x", watchdog=-1)
    with pytest.raises(ValidationError):
        JobCreate(scriptId="one")
    with pytest.raises(ValidationError):
        JobCreate(scriptId=1, params=[{"nested": 1}])
    with pytest.raises(ValidationError, match="ARG_MAX"):
        JobCreate(scriptId=1, params=["x"] * 200_000)


def test_long_command_becomes_script() -> None:
    short = RunSpec.for_command(1, "echo hi", "1-1-ab")
    long = RunSpec.for_command(2, "#" * 100_000, "2-1-cd")
    assert short.command == "echo hi"
    assert short.script is None
    assert long.command is None
    assert long.script is not None
    assert long.script.interpreter == "/bin/sh"


def test_config_written_and_overridden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    monkeypatch.setenv(config.DATABASE_URL_ENV, "sqlite:////tmp/elsewhere.db")
    settings = config.load_settings(path)
    assert path.exists()
    assert "# strategy" in path.read_text()
    assert settings.resolved_database_url() == "sqlite:////tmp/elsewhere.db"
    path.write_text('strategy = "fastest"\n')
    with pytest.raises(config.ConfigError, match="round_robin"):
        config.load_settings(path)
    path.write_text("port = [\n")
    with pytest.raises(config.ConfigError, match="invalid TOML"):
        config.load_settings(path)
