"""Interop with the real Go ttrpc 1.1.1 (Debian's golang-github-containerd-ttrpc-dev).

Both directions: our conformance client against Go's server, and Go's
conformance client against both of our servers. The Go peer is built
offline from Debian's packages by ``go/build.sh``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "..", "src")
# Python peers run this checkout's ttrpc, not whichever one is installed.
PEER_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
}


@pytest.fixture(scope="session")
def go_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("go-interop"))
    build = subprocess.run(
        [os.path.join(HERE, "go", "build.sh"), out],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"Go peer build failed:\n{build.stdout}\n{build.stderr}"
    return out


def start_server(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=PEER_ENV
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # the server prints READY once it listens
    if line != "READY":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"{argv[0]} did not start: {line!r}\n{err}")
    return proc


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("server did not exit on SIGTERM")
    assert proc.returncode == 0, f"server exited {proc.returncode}: {err}"


def run_checks(argv: list[str]) -> None:
    run = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=PEER_ENV)
    lines = run.stdout.splitlines()
    failures = [line for line in lines if line.startswith("FAIL")]
    assert not failures, "\n".join(failures) + "\n" + run.stderr[-3000:]
    assert lines and lines[-1].endswith(" 0 failed"), run.stdout + run.stderr
    passed = int(lines[-1].split()[0])
    assert passed >= 20, f"too few checks ran: {lines[-1]}"
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture
def go_server(go_bin: str, sock_dir: str) -> Iterator[str]:
    address = f"unix://{sock_dir}/go.sock"
    proc = start_server([os.path.join(go_bin, "go-server"), address, "-require-same-user"])
    try:
        yield address
    finally:
        stop_server(proc)


@pytest.mark.timeout(300)
def test_python_clients_against_go_server(go_server: str) -> None:
    run_checks([sys.executable, os.path.join(HERE, "client.py"), go_server])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["aio", "blocking"])
def test_go_client_against_python_server(kind: str, go_bin: str, sock_dir: str) -> None:
    address = f"unix://{sock_dir}/py.sock"
    argv = [sys.executable, os.path.join(HERE, "server.py"), address, "--require-same-user"]
    if kind == "blocking":
        argv.append("--blocking")
    proc = start_server(argv)
    try:
        run_checks([os.path.join(go_bin, "go-client"), address, "-strict"])
    finally:
        stop_server(proc)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["aio", "blocking"])
def test_go_client_over_the_connection_limit(kind: str, go_bin: str, sock_dir: str) -> None:
    """Go's client, one connection over a Python server's limit, gets RESOURCE_EXHAUSTED for
    its call (then ErrClosed), and is served once a slot is free."""
    address = f"unix://{sock_dir}/py.sock"
    argv = [sys.executable, os.path.join(HERE, "server.py"), address, "--max-connections", "3"]
    if kind == "blocking":
        argv.append("--blocking")
    proc = start_server(argv)
    try:
        run = subprocess.run(
            [os.path.join(go_bin, "go-client"), address, "-limit", "3"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.stdout.splitlines()[-1:] == ["1 passed, 0 failed"], run.stdout + run.stderr
        assert "too many connections" in run.stderr, run.stderr
    finally:
        stop_server(proc)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["aio", "blocking"])
def test_python_clients_against_python_servers(kind: str, sock_dir: str) -> None:
    """Our two clients against our two servers (all four pairings), streams included.

    Go ttrpc 1.1.1 has no streams: the stream checks are between our own
    implementations, plus raw frames written byte by byte from the 1.2 rules.
    """
    address = f"unix://{sock_dir}/py.sock"
    argv = [sys.executable, os.path.join(HERE, "server.py"), address]
    if kind == "blocking":
        argv.append("--blocking")
    proc = start_server(argv)
    try:
        run_checks([sys.executable, os.path.join(HERE, "client.py"), address, "--streams"])
    finally:
        stop_server(proc)


@pytest.mark.timeout(300)
def test_go_client_against_go_server_baseline(go_server: str, go_bin: str) -> None:
    """The Go peer passes its own non-strict checks against Go's server: the checks are sound."""
    run_checks([os.path.join(go_bin, "go-client"), go_server])
