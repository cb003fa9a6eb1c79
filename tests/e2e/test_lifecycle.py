"""Detached containers: exec, ps, kill, delete, pause/resume, metrics, events, OOM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .containerd import wait_for
from .harness import E2E, EventStream, Source

SOURCES: list[Source] = ["image", "rootfs"]
# pid 1 ignores signals it has no handler for: trap SIGTERM so that `ctr task kill` works.
TERMINABLE = ("/bin/sh", "-c", 'trap "exit 143" TERM; sleep 1000 & wait')
SLEEPER = ("/bin/sleep", "1000")


def _ps_pids(e2e: E2E, cid: str) -> list[int]:
    res = e2e.cd.ctr("task", "ps", cid)
    assert res.returncode == 0, e2e.cd.explain(res, "ctr task ps failed")
    lines = res.stdout.splitlines()
    assert lines and lines[0].split()[0] == "PID", f"unexpected ps output {res.stdout!r}"
    return [int(line.split()[0]) for line in lines[1:] if line.strip()]


def _freezer_state(pid: int) -> str:
    """FROZEN/THAWED/FREEZING of the cgroup holding ``pid`` (cgroup v1 freezer or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return (Path("/sys/fs/cgroup/freezer" + path) / "freezer.state").read_text().strip()
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            frozen = (Path("/sys/fs/cgroup" + path) / "cgroup.freeze").read_text().strip()
            return "FROZEN" if frozen == "1" else "THAWED"
    raise AssertionError(f"no freezer cgroup for pid {pid}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", SOURCES)
def test_detached_exec_ps_kill_delete(e2e: E2E, source: Source) -> None:
    cd = e2e.cd
    cid = e2e.start(*TERMINABLE, source=source)
    init_pid = cd.tasks()[cid].pid
    assert init_pid > 0

    # The init shell forks its sleep right after start: poll until ps shows both.
    pids = wait_for(
        lambda: p if len(p := _ps_pids(e2e, cid)) == 2 else None,
        timeout=10,
        what="ctr task ps to show the shell and its sleep",
    )
    assert init_pid in pids, f"init pid {init_pid} not in ctr task ps: {pids}"

    run = e2e.exec_held(cid, "exec1", "echo exec-out; echo exec-err >&2", exit_code=5)
    assert run.output() == b"exec-out\n", run.proc.describe()
    run.proc.wait_errors(b"exec-err\n", timeout=30)
    during = _ps_pids(e2e, cid)
    assert set(pids) < set(during), f"exec processes missing from ctr task ps: {during}"
    assert run.finish() == 5, f"exec exit status not propagated\n{run.proc.describe()}"

    # An exec'd process (not pid 1) killed by a signal reports 128+signal.
    res = cd.ctr("task", "exec", "--exec-id", "exec2", cid, "/bin/sh", "-c", "kill -9 $$")
    assert res.returncode == 137, cd.explain(res, "exec killed by SIGKILL should give 137")

    # The same exec id can be used again once the previous exec is gone.
    res = cd.ctr("task", "exec", "--exec-id", "exec1", cid, "/bin/sh", "-c", "exit 6")
    assert res.returncode == 6, cd.explain(res, "exec id reuse")

    res = cd.ctr("task", "kill", "--signal", "SIGTERM", cid)
    assert res.returncode == 0, cd.explain(res, "ctr task kill failed")
    cd.wait_status(cid, ("STOPPED",))
    e2e.remove(cid, expect_exit=143)
    assert cid not in e2e.containers()


@pytest.mark.timeout(60)
def test_kill_sigkill(e2e: E2E) -> None:
    cid = e2e.start(*SLEEPER)
    res = e2e.cd.ctr("task", "kill", "--signal", "SIGKILL", cid)
    assert res.returncode == 0, e2e.cd.explain(res, "ctr task kill failed")
    e2e.cd.wait_status(cid, ("STOPPED",))
    e2e.remove(cid, expect_exit=137)


@pytest.mark.timeout(60)
def test_exec_stdin(e2e: E2E) -> None:
    # `ctr task exec` forwards its stdin like `ctr run`; EOF only after the exec said "ready".
    cid = e2e.start(*SLEEPER)
    run = e2e.exec_held(cid, "cat", "echo ready; cat", stdin_pipe=True)
    run.proc.wait_output("ready\n", timeout=30)
    payload = b"through exec stdin\n" * 1000
    run.proc.write(payload)
    run.proc.close_stdin()
    assert run.output() == b"ready\n" + payload, run.proc.describe()
    assert run.finish() == 0, run.proc.describe()


@pytest.mark.timeout(60)
def test_pause_resume(e2e: E2E) -> None:
    cd = e2e.cd
    events = EventStream(e2e)
    cid = e2e.start(*SLEEPER)
    pid = cd.tasks()[cid].pid

    res = cd.ctr("task", "pause", cid)
    assert res.returncode == 0, cd.explain(res, "ctr task pause failed")
    assert cd.task_status(cid) == "PAUSED"
    wait_for(lambda: _freezer_state(pid) == "FROZEN", timeout=10, what="cgroup FROZEN")

    res = cd.ctr("task", "resume", cid)
    assert res.returncode == 0, cd.explain(res, "ctr task resume failed")
    assert cd.task_status(cid) == "RUNNING"
    assert _freezer_state(pid) == "THAWED"

    res = cd.ctr("task", "exec", "--exec-id", "after", cid, "/bin/sh", "-c", "exit 4")
    assert res.returncode == 4, cd.explain(res, "exec after resume")

    def paused_and_resumed() -> bool:
        events.sync()
        topics = [ev.topic for ev in events.task_events(cid)]
        return "/tasks/paused" in topics and "/tasks/resumed" in topics

    wait_for(
        paused_and_resumed,
        timeout=10,
        what="/tasks/paused and /tasks/resumed events",
        describe=lambda: str(events.task_events(cid)),
    )
    topics = [ev.topic for ev in events.task_events(cid)]
    assert topics.index("/tasks/paused") < topics.index("/tasks/resumed"), topics


@pytest.mark.timeout(60)
def test_metrics(e2e: E2E) -> None:
    cd = e2e.cd
    limit = 64 * 1024 * 1024
    cid = e2e.start(*TERMINABLE, flags=("--memory-limit", str(limit)))

    def metrics() -> dict[str, Any] | None:
        res = cd.ctr("task", "metrics", "--format", "json", cid)
        assert res.returncode == 0, cd.explain(res, "ctr task metrics failed")
        data: dict[str, Any] = json.loads(res.stdout)
        return data if data["pids"]["current"] == 2 else None  # sh + its sleep

    data = wait_for(metrics, timeout=10, what="metrics to count 2 pids (sh + sleep)")
    memory, cpu = data["memory"], data["cpu"]
    if isinstance(memory.get("usage"), dict):  # cgroup v1
        assert memory["usage"]["usage"] > 0, memory
        assert memory["usage"]["limit"] == limit, memory
        assert cpu["usage"]["total"] > 0, cpu
    else:  # cgroup v2
        assert memory["usage"] > 0, memory
        assert memory["usage_limit"] == limit, memory
        assert cpu["usage_usec"] > 0, cpu

    table = cd.ctr("task", "metrics", cid)
    assert table.returncode == 0, cd.explain(table, "ctr task metrics (table) failed")
    assert cid in table.stdout and "pids.current" in table.stdout, table.stdout
    assert "memory." in table.stdout and "cpu" in table.stdout, table.stdout


@pytest.mark.timeout(60)
def test_events_order(e2e: E2E) -> None:
    cd = e2e.cd
    events = EventStream(e2e)
    cid = e2e.start(*TERMINABLE)
    init_pid = cd.tasks()[cid].pid
    res = cd.ctr("task", "exec", "--exec-id", "ev-exec", cid, "/bin/sh", "-c", "exit 3")
    assert res.returncode == 3, cd.explain(res, "exec failed")
    assert cd.ctr("task", "kill", cid).returncode == 0
    cd.wait_status(cid, ("STOPPED",))
    e2e.remove(cid, expect_exit=143)

    expected = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/exit",
        "/tasks/delete",
    ]

    def complete() -> bool:
        events.sync()
        return len(events.task_events(cid)) >= len(expected)

    wait_for(
        complete, timeout=10, what="all task events", describe=lambda: str(events.task_events(cid))
    )
    got = events.task_events(cid)
    assert [ev.topic for ev in got] == expected, "\n".join(f"{e.topic} {e.body}" for e in got)
    create, start, added, started, exec_exit, init_exit, delete = (ev.body for ev in got)
    assert create["pid"] == start["pid"] == init_pid, (create, start)
    assert create["bundle"].endswith(cid), create
    assert added["exec_id"] == started["exec_id"] == "ev-exec", (added, started)
    assert (exec_exit["id"], exec_exit["pid"], exec_exit["exit_status"]) == (
        "ev-exec",
        started["pid"],
        3,
    ), exec_exit
    assert (init_exit["id"], init_exit["pid"], init_exit["exit_status"]) == (cid, init_pid, 143), (
        init_exit
    )
    assert (delete["pid"], delete["exit_status"]) == (init_pid, 143), delete


@pytest.mark.timeout(60)
def test_oom_kill(e2e: E2E) -> None:
    events = EventStream(e2e)
    cid = e2e.new_id()
    # The shell keeps 64 MiB of command substitution in memory: far over the 16 MiB limit.
    script = 'x=$(head -c 64m /dev/zero | tr "\\0" a); echo survived ${#x}'
    res = e2e.run("/bin/sh", "-c", script, cid=cid, flags=("--memory-limit", str(16 * 1024 * 1024)))
    assert res.returncode == 137, e2e.cd.explain(res, "expected an OOM kill (137)")
    assert "survived" not in res.stdout

    def oom_seen() -> bool:
        events.sync()
        return any(ev.topic == "/tasks/oom" for ev in events.task_events(cid))

    wait_for(
        oom_seen, timeout=10, what="/tasks/oom event", describe=lambda: str(events.task_events(cid))
    )
    exits = [ev.body for ev in events.task_events(cid) if ev.topic == "/tasks/exit"]
    assert [body["exit_status"] for body in exits] == [137], exits
