"""Our shim's zygote: daemons forked from a pre-imported parent, and the fallback without it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path

import pytest

from .conftest import PY_RUNTIME
from .containerd import (
    Containerd,
    process_alive,
    wait_for,
    zygote_socket_path,
    zygote_spares,
)
from .harness import E2E, wait_gone

SLEEPER = ("/bin/sleep", "1000")


@pytest.fixture
def runtime() -> str:
    """The zygote is our shim's: this module runs only with it (overrides conftest's list)."""
    return PY_RUNTIME


@pytest.fixture
def py(e2e: E2E) -> E2E:
    assert e2e.runtime == PY_RUNTIME
    return e2e


def _how_started(cd: Containerd, shim_pid: int) -> str:
    """'forked by zygote N' or 'spawned', from the shim's start-up log line."""

    def find() -> str | None:
        found = re.findall(
            rf"serving on inherited socket, pid {shim_pid} \(([^)]*)\)", cd.log_tail(400)
        )
        return found[-1] if found else None

    return wait_for(find, timeout=10, what=f"shim {shim_pid}'s start-up line")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


@pytest.mark.timeout(120)
def test_a_spare_daemon_forked_ahead_serves_the_next_start(py: E2E) -> None:
    cd = py.cd
    first = py.start(*SLEEPER)
    [first_pid] = cd.shim_pids(first)
    zygote_pid = int(_how_started(cd, first_pid).split()[-1])
    # Once no start came for a moment, the zygote forks the next daemon ahead of time.
    [spare] = wait_for(lambda: zygote_spares(zygote_pid), timeout=10, what="a spare daemon")
    stat = _stat(spare)
    assert int(stat[1]) != zygote_pid and int(stat[3]) == spare  # re-parented, own session
    # None of the zygote's descriptors (listener, lock): /dev/null and its socket pair.
    links = [os.readlink(f"/proc/{spare}/fd/{fd}") for fd in os.listdir(f"/proc/{spare}/fd")]
    others = [link for link in links if link != "/dev/null"]
    assert len(links) == 4 and len(others) == 1 and others[0].startswith("socket:"), links

    second = py.start(*SLEEPER)
    assert cd.shim_pids(second) == [spare], "the next start should get the spare"
    assert _how_started(cd, spare) == f"forked by zygote {zygote_pid}"
    res = cd.ctr("task", "exec", "--exec-id", "on-spare", second, "/bin/sh", "-c", "exit 5")
    assert res.returncode == 5, cd.explain(res, "exec in a container of the spare")
    [new_spare] = wait_for(lambda: zygote_spares(zygote_pid), timeout=10, what="the next spare")
    assert new_spare != spare

    # A spare lives only as long as its zygote; the shims it became live on.
    os.kill(zygote_pid, signal.SIGKILL)
    wait_gone(cd, new_spare)
    assert process_alive(spare)
    for c in (first, second):
        res = cd.ctr("task", "kill", "--signal", "SIGKILL", c)
        assert res.returncode == 0, cd.explain(res, f"kill {c}")
    for c in (first, second):
        cd.wait_status(c, ("STOPPED",))
        py.remove(c, expect_exit=137)


@pytest.mark.timeout(120)
def test_shims_are_forked_by_the_zygote_and_outlive_it(py: E2E) -> None:
    cd = py.cd
    first = py.start(*SLEEPER)  # launches the zygote if none runs yet, and waits for it
    cid = py.start(*SLEEPER)
    [shim_pid] = cd.shim_pids(cid)
    how = _how_started(cd, shim_pid)
    assert how.startswith("forked by zygote "), how
    zygote_pid = int(how.split()[-1])
    assert b"containerd_shim.zygote" in Path(f"/proc/{zygote_pid}/cmdline").read_bytes()
    stat = _stat(shim_pid)
    ppid, session = int(stat[1]), int(stat[3])
    assert shim_pid != zygote_pid
    assert ppid != zygote_pid, "the daemon should be re-parented, not the zygote's child"
    assert session == shim_pid, "the daemon should lead its own session"
    # Its command line is the daemon's, its OOM score containerd's + 1 (set by `start`).
    cmdline = Path(f"/proc/{shim_pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert cmdline[cmdline.index(b"-address") + 1] == cd.address.encode()
    assert cmdline[cmdline.index(b"-id") + 1] == cid.encode()
    assert cd.proc is not None
    assert _oom_score_adj(shim_pid) == min(_oom_score_adj(cd.proc.pid) + 1, 1000)

    os.kill(zygote_pid, signal.SIGKILL)
    wait_gone(cd, zygote_pid)
    assert process_alive(shim_pid), "the shim died with the zygote"
    res = cd.ctr("task", "exec", "--exec-id", "after-zygote", cid, "/bin/sh", "-c", "exit 7")
    assert res.returncode == 7, cd.explain(res, "exec after the zygote died")

    # The next `start` finds no zygote: it launches a new one and waits for it.
    third = py.start(*SLEEPER)
    [third_pid] = cd.shim_pids(third)
    how = _how_started(cd, third_pid)
    assert how.startswith("forked by zygote "), how
    new_zygote = int(how.split()[-1])
    assert new_zygote != zygote_pid

    # A zygote that cannot start (its socket path is taken): `start` spawns the daemon itself.
    os.kill(new_zygote, signal.SIGKILL)
    wait_gone(cd, new_zygote)
    path = zygote_socket_path()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.mkdir(path)
    try:
        fourth = py.start(*SLEEPER)
    finally:
        os.rmdir(path)
    [fourth_pid] = cd.shim_pids(fourth)
    assert _how_started(cd, fourth_pid) == "spawned"

    for c in (first, cid, third, fourth):
        res = cd.ctr("task", "kill", "--signal", "SIGKILL", c)
        assert res.returncode == 0, cd.explain(res, f"kill {c}")
    for c in (first, cid, third, fourth):
        cd.wait_status(c, ("STOPPED",))
        py.remove(c, expect_exit=137)
    wait_gone(cd, shim_pid)
    wait_gone(cd, third_pid)
    wait_gone(cd, fourth_pid)
