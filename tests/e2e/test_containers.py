"""Foreground containers (`ctr run --rm`): output, exit codes, stdin, large output, tty.

Output is read while the container still lives (see ``harness.held``); what a process writes
right before it exits is checked through a file:// log, where the shim itself must drain it.
"""

from __future__ import annotations

import hashlib

import pytest

from .harness import E2E, Source

SOURCES: list[Source] = ["image", "rootfs"]
YES_LINE = "abcdefghijklmnopqrstuvwxyz0123456789"
FIVE_MB = 5 * 1024 * 1024


def _yes_bytes(size: int) -> bytes:
    line = (YES_LINE + "\n").encode()
    return (line * (size // len(line) + 1))[:size]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", SOURCES)
def test_run_prints_output(e2e: E2E, source: Source) -> None:
    run = e2e.run_held("/bin/echo hello world", source=source)
    assert run.output() == b"hello world\n", run.proc.describe()
    code = run.finish()
    assert code == 0, f"ctr run exited {code}\n{run.proc.describe()}\n{e2e.cd.log_tail()}"
    assert run.cid not in e2e.containers(), "--rm left the container behind"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", SOURCES)
def test_exit_code_propagates(e2e: E2E, source: Source) -> None:
    res = e2e.run("/bin/sh", "-c", "exit 7", source=source)
    assert res.returncode == 7, e2e.cd.explain(res, "exit status 7 not propagated")
    res = e2e.run("/bin/true", source=source)
    assert res.returncode == 0, e2e.cd.explain(res, "exit status 0 not propagated")


@pytest.mark.timeout(60)
def test_stdout_and_stderr_are_separate(e2e: E2E) -> None:
    run = e2e.run_held("echo to-out; echo to-err >&2; echo more-out", exit_code=3)
    assert run.output() == b"to-out\nmore-out\n", run.proc.describe()
    run.proc.wait_errors(b"to-err\n", timeout=30)
    assert run.finish() == 3, run.proc.describe()
    assert run.proc.errors == b"to-err\n", run.proc.describe()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", SOURCES)
def test_stdin_is_forwarded(e2e: E2E, source: Source) -> None:
    # ctr 1.6 always forwards its stdin (there is no -i flag) and drops an EOF that arrives
    # before the task exists: let the container say "ready" first, then send data and EOF.
    payload = b"".join(b"line %06d of the stdin payload\n" % i for i in range(8000))  # ~250 KB
    run = e2e.run_held("echo ready; cat", source=source, stdin_pipe=True)
    run.proc.wait_output("ready\n", timeout=30)
    run.proc.write(payload)
    run.proc.close_stdin()  # the EOF must reach cat (CloseIO), or the end mark never comes
    got = run.output()
    assert got == b"ready\n" + payload, (
        f"stdin round trip: got {len(got)} bytes, want {len(payload) + 6}\n{run.proc.describe()}"
    )
    assert run.finish() == 0, run.proc.describe()


@pytest.mark.timeout(90)
def test_large_output_every_byte(e2e: E2E) -> None:
    script = f"echo err-start >&2; yes {YES_LINE} | head -c {FIVE_MB}; echo err-end >&2"
    run = e2e.run_held(script)
    got = run.output(timeout=60)
    expected = _yes_bytes(FIVE_MB)
    assert len(got) == len(expected), f"got {len(got)} bytes, want {len(expected)}"
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest(), "content differs"
    run.proc.wait_errors(b"err-end\n", timeout=30)
    assert run.finish() == 0, run.proc.describe()
    assert run.proc.errors == b"err-start\nerr-end\n", run.proc.describe()


@pytest.mark.timeout(90)
def test_output_written_right_before_exit(e2e: E2E) -> None:
    # With a file:// log URI the shim writes the output itself, and must have drained the
    # container's pipe before the task is deleted: 5 MB written up to the exit must all be there.
    # (stdout only: Go's shim sometimes loses stderr when both go to the same file.)
    cid = e2e.new_id()
    log = e2e.cd.tmp / "logs" / f"{cid}.log"
    log.parent.mkdir(exist_ok=True)
    script = f"yes {YES_LINE} | head -c {FIVE_MB}; printf LAST; exit 5"
    res = e2e.run("/bin/sh", "-c", script, cid=cid, flags=("--log-uri", f"file://{log}"))
    assert res.returncode == 5, e2e.cd.explain(res, "ctr run failed")
    got = log.read_bytes()
    expected = _yes_bytes(FIVE_MB) + b"LAST"
    assert len(got) == len(expected), f"got {len(got)} bytes, want {len(expected)}"
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest(), "content differs"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", SOURCES)
def test_tty(e2e: E2E, source: Source) -> None:
    # ctr -t needs a terminal on its own stdin: give it a pty (made transparent, so that it
    # adds nothing) and read the master side.
    script = "test -t 0 && test -t 1 && echo tty-ok; echo $TERM"
    run = e2e.run_held(script, exit_code=4, flags=("-t",), source=source, tty=True)
    # A terminal turns \n into \r\n: proof that the output went through the container's pty.
    assert run.output() == b"tty-ok\r\nxterm\r\n", run.proc.describe()
    code = run.finish()
    assert code == 4, f"ctr run -t exited {code}\n{run.proc.describe()}\n{e2e.cd.log_tail()}"
    assert run.cid not in e2e.containers(), "--rm left the container behind"


@pytest.mark.timeout(60)
def test_container_starts_with_default_signal_dispositions(e2e: E2E) -> None:
    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec: a Python shim
    # must not pass that on to runc and the container.
    run = e2e.run_held("grep SigIgn /proc/self/status")
    line = run.output().decode().strip()
    assert line.startswith("SigIgn:"), run.proc.describe()
    ignored = int(line.split()[1], 16)
    sigpipe, sigxfsz = 1 << (13 - 1), 1 << (25 - 1)
    assert not ignored & (sigpipe | sigxfsz), f"{line} ({e2e.runtime})"
    assert run.finish() == 0, run.proc.describe()
