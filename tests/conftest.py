"""Shared fixtures: real sshd worker hosts and real server processes."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import testhost  # noqa: E402  (lives in scripts/, added to the path above)

from tests.support.server import Server, reset_mariadb  # noqa: E402

BACKENDS = ["sqlite", "mariadb"]


@pytest.fixture(scope="session")
def ssh_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    """Start three sshd hosts for the whole run."""
    hosts = testhost.start_hosts(3, tmp_path_factory.mktemp("hosts"))
    yield hosts
    testhost.stop_hosts(hosts)


@pytest.fixture(scope="session")
def small_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Start an sshd host with MaxSessions 2."""
    base = tmp_path_factory.mktemp("small")
    host = testhost.SshHost(base / "small", name="small", max_sessions=2)
    host.start()
    yield host
    host.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Return the database backend under test."""
    return str(request.param)


@pytest.fixture
def server_factory(tmp_path: Path, backend: str) -> Iterator[object]:
    """Build servers on the selected backend; stop them after the test."""
    started: list[Server] = []

    def make(**settings: object) -> Server:
        url = ""
        if backend == "mariadb":
            from tests.support.server import MARIADB_URL

            reset_mariadb()
            url = MARIADB_URL
        server = Server(tmp_path / f"server{len(started)}", url, **settings)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory: object) -> Server:
    """Start one server with default test settings."""
    return server_factory()  # type: ignore[operator,no-any-return]
