"""Many exits at once: 100 containers released by one trigger, each exit reported right, once.

Every container's init is ``read x < /run/go; exit N`` with a distinct N, on a fifo that the
test shares into all of them with a bind mount. The test holds the fifo open for reading
and writing, so each container's open returns at once and its ``read`` blocks; once every
container holds the fifo (checked through /proc), the test closes its end: the kernel
wakes all 100 readers with EOF at the same moment and they all exit together.

Exits are checked three ways: containerd's Wait (a gRPC call per task, in flight before
the release, answered by the shim), the event stream (exactly one /tasks/exit per
container with its status, before its /tasks/delete), and ``ctr task delete``.

Two layouts, for both runtimes: a shim per container (containerd and 100 shims under one
burst), and all 100 in one shim (``io.containerd.runc.v2.group``, which both shims honour:
one reaper takes 100 exits at once).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .containerd import process_alive, wait_for
from .harness import E2E, EventStream, deleted_exit_status
from .tasks_api import TasksAPI

COUNT = 100
GROUP_ANNOTATION = "io.containerd.runc.v2.group"


def _exit_code(index: int) -> int:
    return index % 250 + 1  # distinct for up to 250 containers, never 0


@contextlib.contextmanager
def _trigger(directory: Path) -> Iterator[tuple[Path, int]]:
    """A fifo held open read-write by us: (path, fd). Closing the fd releases the readers."""
    fifo = directory / "go"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fifo, fd
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _holds(pid: int, fifo: os.stat_result) -> bool:
    """True if ``pid`` has the fifo open (any descriptor)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (fifo.st_dev, fifo.st_ino):
            return True
    return False


@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", ["shim-each", "one-shim"])
def test_hundred_containers_exit_at_once(e2e: E2E, layout: str, tmp_path: Path) -> None:
    cd = e2e.cd
    ids = [e2e.new_id() for _ in range(COUNT)]
    codes = {cid: _exit_code(i) for i, cid in enumerate(ids)}
    events = EventStream(e2e)
    timings: dict[str, float] = {}

    with _trigger(tmp_path) as (fifo, hold), TasksAPI(cd) as api:
        flags = ["-d", "--mount", f"type=bind,src={tmp_path},dst=/run,options=rbind:ro"]
        if layout == "one-shim":
            flags += ["--annotation", f"{GROUP_ANNOTATION}={e2e.name}-{os.getpid()}"]

        def run(cid: str) -> None:
            script = f"read x < /run/{fifo.name}; exit {codes[cid]}"
            res = cd.ctr(*e2e.run_args(cid, "/bin/sh", "-c", script, flags=flags, source="rootfs"))
            assert res.returncode == 0, cd.explain(res, f"ctr run -d {cid}")

        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(run, ids))
        timings["start"] = time.monotonic() - began

        tasks = cd.tasks()
        assert all(tasks[cid].status == "RUNNING" for cid in ids), tasks
        pids = {cid: tasks[cid].pid for cid in ids}
        assert len(set(pids.values())) == COUNT, "init pids not distinct"
        shims = {pid for cid in ids for pid in cd.shim_pids(cid)}
        if layout == "one-shim":
            assert len(shims) == 1, f"expected one shim for all, got {sorted(shims)}"
        else:
            assert len(shims) == COUNT, f"expected a shim per container, got {len(shims)}"

        # Every container must hold the fifo before we let go of it: one that opened it
        # later would wait for a writer for ever.
        fifo_stat = os.stat(fifo)
        wait_for(
            lambda: all(_holds(pid, fifo_stat) for pid in pids.values()),
            timeout=30,
            what="every container to open the trigger fifo",
            describe=lambda: (
                "not yet: "
                + str([cid for cid, pid in pids.items() if not _holds(pid, fifo_stat)][:10])
            ),
        )
        # containerd's Wait for every task, in flight before the exits.
        waits = {cid: api.wait_async(cid, timeout=120) for cid in ids}
        answered: list[float] = []
        for future in waits.values():
            future.add_done_callback(lambda _: answered.append(time.monotonic()))
        events.sync()

        def wait_then_delete(cid: str) -> tuple[int, int]:
            """As ``ctr run --rm`` does: delete the task as soon as Wait answers."""
            status = int(waits[cid].result().exit_status)
            res = cd.ctr("task", "delete", cid)
            assert res.returncode == 0, cd.explain(res, f"task delete {cid}")
            return status, deleted_exit_status(res.stderr)

        released = time.monotonic()
        os.close(hold)  # all 100 reads see EOF now
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = dict(zip(ids, pool.map(wait_then_delete, ids), strict=True))
        wait_for(lambda: len(answered) == COUNT, timeout=10, what="every Wait's callback")
        timings["all waits answered"] = max(answered) - released
        timings["all deleted"] = time.monotonic() - released

    waited = {cid: status for cid, (status, _) in results.items()}
    assert waited == codes, {c: (waited[c], codes[c]) for c in ids if waited[c] != codes[c]}
    deleted = {cid: status for cid, (_, status) in results.items()}
    assert deleted == codes, {c: (deleted[c], codes[c]) for c in ids if deleted[c] != codes[c]}
    assert not any(process_alive(pid) for pid in pids.values())

    def delete_seen() -> bool:
        events.sync()
        found = {
            ev.body.get("container_id") for ev in events.events() if ev.topic == "/tasks/delete"
        }
        return set(ids) <= found

    wait_for(delete_seen, timeout=30, what="a /tasks/delete for every container")
    exits = {
        cid: [
            ev.body.get("exit_status", 0)
            for ev in events.task_events(cid)
            if ev.topic == "/tasks/exit"
        ]
        for cid in ids
    }
    wrong = {cid: got for cid, got in exits.items() if got != [codes[cid]]}
    assert not wrong, f"exit events not exactly one with the right status: {wrong}"
    for cid in ids:
        topics = [ev.topic for ev in events.task_events(cid)]
        expected = ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        assert topics == expected, (cid, topics)
        [deleted_event] = [ev.body for ev in events.task_events(cid) if ev.topic == "/tasks/delete"]
        assert deleted_event.get("exit_status", 0) == codes[cid], (cid, deleted_event)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda cid: cd.ctr("container", "delete", cid, check=True), ids))
    wait_for(
        lambda: not any(process_alive(pid) for pid in shims),
        timeout=30,
        what="every shim to exit after its tasks were deleted",
    )
    print(f"\n{e2e.runtime} {layout}: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
