"""containerd SIGKILLed and restarted at points of a task's life where something is pending.

``test_resilience.py`` restarts containerd (SIGTERM) with a task running. Here containerd is
killed outright (SIGKILL, as a crash or an OOM kill would) with a task created but not
started, with exec processes running, and with init processes that exited before or while
containerd was down. After the restart the task must be startable, waitable and deletable
through containerd, and every exit must be reported with its status: by Wait and Delete,
and by the shim's /tasks/exit event, which it keeps retrying until containerd is back (read
from containerd's debug log: the event may arrive before a new ``ctr events`` subscribes).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from .containerd import process_alive, process_state, wait_for
from .harness import E2E, EventStream, wait_gone
from .tasks_api import Status, TasksAPI

SLEEPER = ("/bin/sleep", "1000")


def _terminable(code: int) -> tuple[str, ...]:
    """A shell that exits with ``code`` on SIGTERM. Its sleep outlives it (in an exec), so
    it holds none of the process's stdio: the shims would wait for that output to drain."""
    script = f'trap "exit {code}" TERM; sleep 1000 </dev/null >/dev/null 2>&1 & wait'
    return ("/bin/sh", "-c", script)


def _wait_reaped(pid: int) -> None:
    """Wait until ``pid`` is gone, zombie included: its shim has reaped it (recorded the exit)."""
    wait_for(lambda: process_state(pid) is None, timeout=10, what=f"pid {pid} to be reaped")


def _exits_forwarded(e2e: E2E, count: int, timeout: float = 30) -> None:
    """Wait until containerd took ``count`` /tasks/exit events since its restart."""
    wait_for(
        lambda: e2e.cd.forwarded_events().count("/tasks/exit") >= count,
        timeout=timeout,
        what=f"{count} /tasks/exit event(s) forwarded since the restart",
        describe=lambda: f"forwarded: {e2e.cd.forwarded_events()}\n{e2e.cd.log_tail()}",
    )


def _wait_stream(events: EventStream, what: str, done: Callable[[], bool]) -> None:
    """Wait until ``done()`` holds for the event stream (events are asynchronous: Wait and
    Delete may answer before their events reach containerd)."""

    def check() -> bool:
        events.sync()
        return done()

    wait_for(check, timeout=30, what=what, describe=lambda: events.proc.text[-3000:])


def _topics(events: EventStream, cid: str) -> list[str]:
    return [ev.topic for ev in events.task_events(cid)]


def _exit_events(events: EventStream, cid: str) -> list[tuple[str, int]]:
    """(process id, exit status) of the /tasks/exit events of ``cid`` on the stream."""
    return [
        (str(ev.body.get("id", "")), int(ev.body.get("exit_status", 0)))
        for ev in events.task_events(cid)
        if ev.topic == "/tasks/exit"
    ]


@pytest.mark.timeout(90)
def test_killed_between_create_and_start(e2e: E2E) -> None:
    cd = e2e.cd
    cid = e2e.new_id()
    # `ctr container create` (unlike `ctr run`) moves flags to the front, its command's
    # too, and a value after the boolean --rootfs: "--rootfs=true" and "--" keep them apart.
    create = ["container", "create", "--runtime", e2e.runtime, "--rootfs=true", str(e2e.rootfs)]
    res = cd.ctr(*create, cid, "--", "/bin/sh", "-c", "exit 5")
    assert res.returncode == 0, cd.explain(res, "ctr container create")
    with TasksAPI(cd) as api:
        pid = api.create(cid)  # ctr cannot create a task without starting it
    assert cd.tasks()[cid].status == "CREATED"
    [shim_pid] = cd.shim_pids(cid)

    cd.kill()
    assert process_alive(shim_pid) and process_alive(pid), "containerd took the task with it"
    cd.start()
    events = EventStream(e2e)

    task = cd.tasks()[cid]
    assert (task.status, task.pid) == ("CREATED", pid), task
    assert cd.shim_pids(cid) == [shim_pid], "the shim was replaced instead of reconnected"
    with TasksAPI(cd) as api:
        assert api.start(cid) == pid
        assert api.wait(cid, timeout=30).exit_status == 5
    _wait_stream(events, "the start and exit events", lambda: len(_topics(events, cid)) >= 2)
    assert _topics(events, cid) == ["/tasks/start", "/tasks/exit"]
    assert _exit_events(events, cid) == [(cid, 5)]
    e2e.remove(cid, expect_exit=5)
    wait_gone(cd, shim_pid)


@pytest.mark.timeout(90)
def test_killed_while_exec_runs(e2e: E2E) -> None:
    cd = e2e.cd
    cid = e2e.start(*SLEEPER, source="rootfs")
    [shim_pid] = cd.shim_pids(cid)
    for exec_id, code in (("gone", 7), ("kept", 8)):
        res = cd.ctr("task", "exec", "-d", "--exec-id", exec_id, cid, *_terminable(code))
        assert res.returncode == 0, cd.explain(res, f"ctr task exec -d {exec_id}")
    with TasksAPI(cd) as api:
        gone_pid, kept_pid = (api.get(cid, x).pid for x in ("gone", "kept"))
    assert process_alive(gone_pid) and process_alive(kept_pid)

    cd.kill()
    os.kill(gone_pid, signal.SIGTERM)  # "gone" exits (7) while containerd is down
    _wait_reaped(gone_pid)
    cd.start()
    events = EventStream(e2e)

    assert cd.shim_pids(cid) == [shim_pid], "the shim was replaced instead of reconnected"
    with TasksAPI(cd) as api:
        gone = api.get(cid, "gone")
        assert (gone.status, gone.exit_status) == (Status.STOPPED, 7), gone
        assert api.wait(cid, "gone").exit_status == 7
        _exits_forwarded(e2e, 1)  # the shim's retried /tasks/exit of "gone"
        kept = api.get(cid, "kept")
        assert (kept.status, kept.pid) == (Status.RUNNING, kept_pid), kept

        # The exec that outlived the restart is managed through the new containerd.
        res = cd.ctr("task", "kill", "--exec-id", "kept", "--signal", "SIGTERM", cid)
        assert res.returncode == 0, cd.explain(res, "ctr task kill --exec-id kept")
        assert api.wait(cid, "kept").exit_status == 8
        assert api.delete_process(cid, "gone") == 7
        assert api.delete_process(cid, "kept") == 8
    res = cd.ctr("task", "exec", "--exec-id", "after", cid, "/bin/sh", "-c", "exit 9")
    assert res.returncode == 9, cd.explain(res, "exec after the restart")

    res = cd.ctr("task", "kill", "--signal", "SIGKILL", cid)
    assert res.returncode == 0, cd.explain(res, "ctr task kill")
    cd.wait_status(cid, ("STOPPED",))
    e2e.remove(cid, expect_exit=137)
    exits = {("kept", 8), ("after", 9), (cid, 137)}
    _wait_stream(events, f"exits {exits}", lambda: exits <= set(_exit_events(events, cid)))
    # Exactly once each: "gone" (retried by the shim), "kept", "after" and the init.
    assert cd.forwarded_events().count("/tasks/exit") == 4, cd.forwarded_events()
    wait_gone(cd, shim_pid)


@pytest.mark.timeout(90)
def test_killed_with_exits_not_deleted(e2e: E2E) -> None:
    cd = e2e.cd
    events = EventStream(e2e)
    # "before" exits while containerd runs; nobody deletes it before containerd dies.
    before = e2e.new_id()
    res = cd.ctr(*e2e.run_args(before, "/bin/sh", "-c", "exit 3", flags=["-d"], source="rootfs"))
    assert res.returncode == 0, cd.explain(res, "ctr run -d")
    cd.wait_status(before, ("STOPPED",))
    # "during" exits (4) on SIGTERM, which it gets while containerd is down.
    during = e2e.start(*_terminable(4), source="rootfs")
    during_pid = cd.tasks()[during].pid
    shims = {cid: cd.shim_pids(cid) for cid in (before, during)}
    _wait_stream(events, f"the exit of {before}", lambda: bool(_exit_events(events, before)))
    assert _exit_events(events, before) == [(before, 3)]

    cd.kill()
    killed_at = time.time_ns()
    os.kill(during_pid, signal.SIGTERM)
    _wait_reaped(during_pid)
    cd.start()
    # Taken after the restart: the shim stamps the exit just after reaping it, which can
    # be a moment after the pid leaves /proc.
    restarted_at = time.time_ns()
    events = EventStream(e2e)

    tasks = cd.tasks()
    assert (tasks[before].status, tasks[during].status) == ("STOPPED", "STOPPED"), tasks
    assert {cid: cd.shim_pids(cid) for cid in (before, during)} == shims
    with TasksAPI(cd) as api:
        assert api.wait(before).exit_status == 3
        waited = api.wait(during)
    assert waited.exit_status == 4
    # The shim recorded the exit when it happened, not when containerd asked.
    assert killed_at <= waited.exited_at_ns <= restarted_at, (killed_at, waited, restarted_at)
    _exits_forwarded(e2e, 1)

    e2e.remove(before, expect_exit=3)
    e2e.remove(during, expect_exit=4)
    _wait_stream(
        events,
        "both delete events",
        lambda: all("/tasks/delete" in _topics(events, cid) for cid in (before, during)),
    )
    deletes = {
        ev.body["container_id"]: ev.body.get("exit_status", 0)
        for cid in (before, during)
        for ev in events.task_events(cid)
        if ev.topic == "/tasks/delete"
    }
    assert deletes == {before: 3, during: 4}, deletes
    # One exit came in since the restart ("during"'s, retried by its shim); "before"'s was
    # delivered before containerd died and is not sent again.
    assert cd.forwarded_events().count("/tasks/exit") == 1, cd.forwarded_events()
    for [shim_pid] in shims.values():
        wait_gone(cd, shim_pid)
