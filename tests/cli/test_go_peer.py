"""``ttrpc call`` against Go's ttrpc 1.1.1 server (the interop peer, built offline from Debian)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import INTEROP, INTEROP_SERVICE, Cli, start_server, stop_server


@pytest.fixture(scope="module")
def go_server(tmp_path_factory: pytest.TempPathFactory, short_tmp: Path) -> Iterator[str]:
    if shutil.which("go") is None:
        pytest.skip("go not installed")
    out = str(tmp_path_factory.mktemp("go-peer"))
    build = subprocess.run(
        [str(INTEROP / "go" / "build.sh"), out],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, f"Go peer build failed:\n{build.stdout}\n{build.stderr}"
    address = f"unix://{short_tmp}/go.sock"
    proc = start_server([os.path.join(out, "go-server"), address])
    try:
        yield address
    finally:
        stop_server(proc)


@pytest.mark.timeout(360)
def test_echo(cli: Cli, go_server: str, interop_set: str) -> None:
    res = cli(
        "call", "--descriptor-set", interop_set, go_server, f"{INTEROP_SERVICE}/Echo",
        "-d", '{"text": "to go", "number": "-9", "data": "/w=="}', "--compact",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert json.loads(res.out) == {"data": "/w==", "text": "to go", "number": "-9"}


@pytest.mark.timeout(360)
def test_metadata_and_deadline_reach_go(cli: Cli, go_server: str, interop_set: str) -> None:
    res = cli(
        "call", "--descriptor-set", interop_set, go_server, f"{INTEROP_SERVICE}/Metadata",
        "-m", "x-trace=abc", "-n", "default", "-t", "30s",
    )  # fmt: skip
    assert res.code == 0, res.err
    reply = json.loads(res.out)
    assert {(p["key"], p["value"]) for p in reply["pairs"]} >= {
        ("x-trace", "abc"),
        ("containerd-namespace-ttrpc", "default"),
    }
    assert reply["hasDeadline"] is True


@pytest.mark.timeout(360)
def test_go_statuses(cli: Cli, go_server: str, interop_set: str) -> None:
    base = ("call", "--descriptor-set", interop_set, go_server)
    res = cli(*base, f"{INTEROP_SERVICE}/Fail", "-d", '{"code": 7, "message": "go says no"}')
    assert (res.code, res.err_lines) == (7, ["ttrpc: PERMISSION_DENIED: go says no"])
    res = cli(*base, f"{INTEROP_SERVICE}/Sleep", "-d", '{"durationMs": 5000}', "-t", "200ms")
    assert res.code == 4, res.err
    # Go answers a service it does not serve with UNIMPLEMENTED.
    res = cli(*base, "containerd.task.v2.Task/State", "-d", '{"id": "x"}')
    assert res.code == 12 and res.err.startswith("ttrpc: UNIMPLEMENTED: "), res.err
    assert len(res.err_lines) == 1
