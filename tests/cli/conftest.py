"""Fixtures for the ``ttrpc`` command's tests: running it in-process, our interop server."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ttrpc.cli import main
from ttrpc.cli.descriptors import compile_protos

REPO = Path(__file__).resolve().parents[2]
INTEROP = REPO / "tests" / "interop"
INTEROP_PROTO = INTEROP / "interop.proto"
INTEROP_SERVICE = "ttrpc.interop.v1.Interop"
STREAMING_PROTO = INTEROP / "streaming.proto"
STREAMING_SERVICE = "ttrpc.interop.v1.Streaming"


@dataclass
class Result:
    """What one run of the command did."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


Cli = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """Run ``ttrpc ARGS...`` in this process; ``stdin=`` gives its standard input."""

    def run(*args: str, stdin: str = "") -> Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(list(args))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def run_process(*args: str, stdin: str = "", timeout: float = 30) -> Result:
    """Run ``python -m ttrpc.cli ARGS...`` as its own process (what a user's shell does)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-m", "ttrpc.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    """A short directory under /tmp (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ttrpc-cli-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def interop_set(short_tmp: Path) -> str:
    """interop.proto compiled once into a descriptor set file (what ``protoc -o`` writes)."""
    path = short_tmp / "interop.pb"
    path.write_bytes(compile_protos([str(INTEROP_PROTO)], [str(INTEROP)]).SerializeToString())
    return str(path)


@pytest.fixture(scope="session")
def streaming_set(short_tmp: Path) -> str:
    """streaming.proto compiled into a descriptor set file (served by the same servers)."""
    path = short_tmp / "streaming.pb"
    path.write_bytes(compile_protos([str(STREAMING_PROTO)], [str(INTEROP)]).SerializeToString())
    return str(path)


def start_server(argv: list[str]) -> subprocess.Popen[str]:
    """Start a server that prints READY once it listens."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "READY":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"{argv[0]} did not start: {line!r}\n{err}")
    return proc


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)


@pytest.fixture(scope="session", params=["aio", "blocking"])
def interop_server(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[str]:
    """Our Interop server (tests/interop/server.py), asyncio and blocking: its address."""
    address = f"unix://{short_tmp}/{request.param}.sock"
    argv = [sys.executable, str(INTEROP / "server.py"), address]
    if request.param == "blocking":
        argv.append("--blocking")
    proc = start_server(argv)
    try:
        yield address
    finally:
        stop_server(proc)
