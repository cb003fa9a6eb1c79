"""Shims outliving containerd, dead shims cleaned up, many containers at once."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import PY_RUNTIME
from .containerd import mounts_under, process_alive, socket_listening, wait_for
from .harness import E2E, wait_gone

SLEEPER = ("/bin/sleep", "1000")


@pytest.mark.timeout(90)
def test_task_survives_containerd_restart(e2e: E2E) -> None:
    cd = e2e.cd
    cid = e2e.start(*SLEEPER)
    init_pid = cd.tasks()[cid].pid
    [shim_pid] = cd.shim_pids(cid)

    cd.restart()

    # containerd reconnects to the shim through the bundle's address file.
    assert cd.wait_status(cid, ("RUNNING",)) == "RUNNING"
    assert cd.tasks()[cid].pid == init_pid
    assert cd.shim_pids(cid) == [shim_pid], "the shim was replaced instead of reconnected"
    res = cd.ctr("task", "exec", "--exec-id", "after-restart", cid, "/bin/sh", "-c", "exit 9")
    assert res.returncode == 9, cd.explain(res, "exec after the restart")

    res = cd.ctr("task", "kill", "--signal", "SIGKILL", cid)
    assert res.returncode == 0, cd.explain(res, "kill after restart failed")
    cd.wait_status(cid, ("STOPPED",))
    e2e.remove(cid, expect_exit=137)
    wait_gone(cd, shim_pid)
    wait_gone(cd, init_pid)


@pytest.mark.timeout(90)
def test_shim_sigkill_is_cleaned_up(e2e: E2E) -> None:
    cd = e2e.cd
    cid = e2e.start(*SLEEPER)  # from the image: the shim mounted its rootfs
    init_pid = cd.tasks()[cid].pid
    bundle = cd.bundle(cid)
    address = (bundle / "address").read_text().strip()
    sock = cd.shim_socket(cid)
    assert address == f"unix://{sock}", f"address file {address!r}, expected {sock}"
    assert socket_listening(sock), f"shim socket {sock} not listening"
    assert mounts_under(bundle / "rootfs"), "image rootfs not mounted in the bundle"
    [shim_pid] = cd.shim_pids(cid)

    os.kill(shim_pid, signal.SIGKILL)
    wait_gone(cd, shim_pid)

    # containerd sees the disconnect and runs `<shim> ... delete`, which kills the container,
    # unmounts its rootfs; containerd then forgets the task.
    cd.wait_status(cid, (None,), timeout=30)
    wait_gone(cd, init_pid)
    wait_for(
        lambda: not mounts_under(bundle),
        timeout=10,
        what=f"no mounts under {bundle}",
        describe=cd.log_tail,
    )
    wait_for(
        lambda: not bundle.exists(),
        timeout=10,
        what=f"bundle {bundle} removed",
        describe=cd.log_tail,
    )
    # Go's shim (1.6) leaves the socket file itself behind: `delete` does not remove it (the
    # next `start` for the same id does). Nothing may listen on it any more, though.
    assert not socket_listening(sock), f"something still listens on {sock}"
    if e2e.runtime == PY_RUNTIME:
        # Ours removes the dead shim's socket file in `delete` as well.
        assert not os.path.exists(sock), f"{sock} left behind"
    assert not cd.shim_pids(cid), "a shim for the container still runs"
    res = cd.ctr("container", "rm", cid)
    assert res.returncode == 0, cd.explain(res, "container rm after shim death failed")
    assert cid not in e2e.containers()


@pytest.mark.timeout(120)
def test_twenty_containers_at_once(e2e: E2E) -> None:
    cd = e2e.cd
    count = 20
    ids = [e2e.new_id() for _ in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        started = list(pool.map(lambda cid: e2e.start(*SLEEPER, cid=cid), ids))
    assert started == ids

    tasks = cd.tasks()
    assert all(tasks[cid].status == "RUNNING" for cid in ids), tasks
    pids = {tasks[cid].pid for cid in ids}
    assert len(pids) == count, f"init pids not distinct: {sorted(pids)}"
    assert all(process_alive(pid) for pid in pids)

    def kill(cid: str) -> int:
        return cd.ctr("task", "kill", "--signal", "SIGKILL", cid).returncode

    with ThreadPoolExecutor(max_workers=count) as pool:
        assert list(pool.map(kill, ids)) == [0] * count

    def all_stopped() -> bool:
        current = cd.tasks()
        return all(current[cid].status == "STOPPED" for cid in ids)

    wait_for(all_stopped, timeout=30, what="all 20 tasks STOPPED", describe=cd.log_tail)

    def remove(cid: str) -> None:
        e2e.remove(cid, expect_exit=137)

    with ThreadPoolExecutor(max_workers=count) as pool:
        list(pool.map(remove, ids))
    assert not set(ids) & e2e.containers()
    assert not set(ids) & set(cd.tasks())
    for pid in pids:
        wait_gone(cd, pid)
