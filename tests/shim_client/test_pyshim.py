"""``pyshim run``: a container through a shim, no containerd, for every shim we have."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Background

from .helpers import GO_V1_SHIM, GO_V2_SHIM, RUNC_ROOT, processes_in, shim_env

# How each shim is chosen on pyshim's command line.
SHIMS = {
    "py-v2": [],
    "py-v1": ["--v1"],
    "go-v2": ["--shim", GO_V2_SHIM],
    "go-v1": ["--shim", GO_V1_SHIM],
}
PYSHIM = [sys.executable, "-m", "containerd_shim.pyshim", "run"]


def _pyshim_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("pyshim-*")}


@pytest.fixture
def no_leaks(namespace: str) -> Iterator[list[str]]:
    """Container ids used by the test; afterwards nothing of theirs may be left."""
    before = _pyshim_dirs()
    ids: list[str] = []
    yield ids
    assert _pyshim_dirs() <= before, "pyshim left its temp dir"
    for cid in ids:
        assert not (RUNC_ROOT / namespace / cid).exists(), f"runc state of {cid} left"
    for pid in processes_in(Path("/tmp")):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert not any(cid.encode() in cmdline for cid in ids), cmdline


def _args(kind: str, namespace: str, cid: str, ids: list[str], *extra: str) -> list[str]:
    ids.append(cid)
    return [*PYSHIM, *SHIMS[kind], "--namespace", namespace, "--id", cid, *extra]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(SHIMS))
def test_output_stdin_and_exit_code(
    kind: str, rootfs: Path, namespace: str, no_leaks: list[str]
) -> None:
    cid = f"pyshim-{kind}-{os.getpid()}"
    script = 'cat; echo "to stderr $GREETING" >&2; hostname; exit 3'
    res = subprocess.run(
        [
            *_args(kind, namespace, cid, no_leaks, "--no-tty", "--env", "GREETING=hi"),
            str(rootfs),
            "--",
            "/bin/sh",
            "-c",
            script,
        ],
        input=b"from stdin\n",
        capture_output=True,
        env=shim_env(),
        timeout=50,
        check=False,
    )
    assert res.returncode == 3, res
    assert res.stdout == f"from stdin\n{cid}\n".encode(), res
    assert res.stderr == b"to stderr hi\n", res


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["py-v2", "go-v1"])
def test_signals_are_forwarded(
    kind: str, rootfs: Path, namespace: str, no_leaks: list[str]
) -> None:
    cid = f"pyshim-sig-{kind}-{os.getpid()}"
    argv = [
        *_args(kind, namespace, cid, no_leaks, "--no-tty"),
        str(rootfs),
        "--",
        "/bin/sh",
        "-c",
        "trap 'exit 9' TERM; echo ready; sleep 1000 & wait",
    ]
    proc = Background(argv, env=shim_env())
    try:
        proc.wait_output("ready\n", timeout=30)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 9, proc.describe()
    finally:
        proc.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["py-v2", "go-v2"])
def test_tty(kind: str, rootfs: Path, namespace: str, no_leaks: list[str]) -> None:
    """With a terminal on stdout, the container gets one too (and its size)."""
    cid = f"pyshim-tty-{kind}-{os.getpid()}"
    argv = [
        *_args(kind, namespace, cid, no_leaks),
        str(rootfs),
        "--",
        "/bin/sh",
        "-c",
        "test -t 0 && test -t 1 && echo is-a-tty; stty size; exit 5",
    ]
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR  # show the container's own line endings
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    termios.tcsetwinsize(slave, (24, 80))
    try:
        proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=shim_env(), start_new_session=True
        )
        os.close(slave)
        slave = -1
        output = bytearray()
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: everybody closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=30) == 5, output
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert b"is-a-tty\r\n" in output, output
    assert b"24 80\r\n" in output, output


def test_errors_exit_125(rootfs: Path) -> None:
    res = subprocess.run(
        [*PYSHIM, "--no-tty", "/nonexistent-rootfs", "--", "/bin/true"],
        capture_output=True,
        env=shim_env(),
        timeout=30,
        check=False,
    )
    assert res.returncode == 125
    assert res.stderr.startswith(b"pyshim: "), res.stderr
    res = subprocess.run(
        [*PYSHIM, "--id", "../escape", str(rootfs), "--", "/bin/true"],
        capture_output=True,
        env=shim_env(),
        timeout=30,
        check=False,
    )
    assert res.returncode == 125 and b"must match" in res.stderr, res
