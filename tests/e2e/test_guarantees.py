"""What a shim owes its users under stress: runc's own errors, no leaked fds, no lost exits."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.protobuf.any_pb2 import Any

import ttrpc.blocking
from containerd_shim.api.runtime.v2.task.shim_pb2 import UpdateTaskRequest
from containerd_shim.api.runtime.v2.task.shim_ttrpc import TaskBlockingClient
from ttrpc import Context

from .containerd import wait_for
from .harness import E2E, EventStream

SLEEPER = ("/bin/sleep", "1000")


@pytest.mark.timeout(60)
def test_runc_failure_reaches_the_user(e2e: E2E) -> None:
    # A command that does not exist: runc's own explanation must come back through containerd.
    res = e2e.run("/bin/no-such-command", source="rootfs")
    assert res.returncode != 0, e2e.cd.explain(res, "a missing command succeeded")
    message = res.stderr
    assert "no-such-command" in message and "no such file or directory" in message, message
    # The shim survived its task's failure: the next container runs fine.
    assert e2e.run("/bin/true", source="rootfs").returncode == 0


@pytest.mark.timeout(60)
def test_container_holds_no_descriptor_of_the_shim(e2e: E2E) -> None:
    cid = e2e.start(*SLEEPER)
    pid = e2e.cd.tasks()[cid].pid
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    targets = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}
    assert fds == [0, 1, 2], f"{e2e.runtime}: container init holds {targets}"
    assert e2e.cd.ctr("task", "kill", "-s", "SIGKILL", cid).returncode == 0
    e2e.cd.wait_status(cid, ("STOPPED",))
    e2e.remove(cid, expect_exit=137)


@pytest.mark.timeout(120)
def test_instant_exits_are_each_reported_once(e2e: E2E) -> None:
    # Containers and execs that are gone before anyone asks: every exit counted, exactly once.
    events = EventStream(e2e)
    cid = e2e.start(*SLEEPER)
    exec_ids = [f"quick-{i}" for i in range(10)]

    def run_exec(exec_id: str) -> int:
        return e2e.cd.ctr("task", "exec", "--exec-id", exec_id, cid, "/bin/true").returncode

    with ThreadPoolExecutor(5) as pool:
        codes = list(pool.map(run_exec, exec_ids))
    assert codes == [0] * len(exec_ids), codes
    quick = [e2e.new_id() for _ in range(10)]

    def run_quick(qid: str) -> int:
        args = e2e.run_args(qid, "/bin/sh", "-c", "exit 9", flags=("--rm",), source="rootfs")
        return e2e.cd.ctr(*args).returncode

    with ThreadPoolExecutor(5) as pool:
        codes = list(pool.map(run_quick, quick))
    assert codes == [9] * len(quick), codes

    def exits_for(container: str) -> list[dict[str, object]]:
        return [ev.body for ev in events.task_events(container) if ev.topic == "/tasks/exit"]

    def all_seen() -> bool:
        events.sync()
        return len(exits_for(cid)) >= len(exec_ids) and all(exits_for(q) for q in quick)

    wait_for(all_seen, timeout=30, what="every exit event")
    exec_exits = exits_for(cid)
    assert sorted(str(e["id"]) for e in exec_exits) == sorted(exec_ids), exec_exits
    assert all(e.get("exit_status", 0) == 0 for e in exec_exits), exec_exits
    for q in quick:
        got = exits_for(q)
        assert len(got) == 1 and got[0].get("exit_status") == 9, (q, got)
    assert e2e.cd.ctr("task", "kill", "-s", "SIGKILL", cid).returncode == 0
    e2e.cd.wait_status(cid, ("STOPPED",))
    e2e.remove(cid, expect_exit=137)


def _memory_limit(pid: int) -> int:
    with open(f"/proc/{pid}/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            with open(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes") as f:
                return int(f.read())
    raise AssertionError(f"no memory cgroup for pid {pid}")


@pytest.mark.timeout(60)
def test_update_resources(e2e: E2E) -> None:
    # ctr 1.6 has no `task update`: call the shim's Update directly, as containerd would.
    cid = e2e.start(*SLEEPER)
    pid = e2e.cd.tasks()[cid].pid
    address = (e2e.cd.bundle(cid) / "address").read_text().strip()
    limit = 48 * 1024 * 1024
    resources = Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
        value=json.dumps({"memory": {"limit": limit}}).encode(),
    )
    ctx = Context(timeout=10, metadata={"containerd-namespace-ttrpc": e2e.cd.namespace})
    with ttrpc.blocking.connect(address, timeout=5) as conn:
        TaskBlockingClient(conn).Update(UpdateTaskRequest(id=cid, resources=resources), ctx)
    assert _memory_limit(pid) == limit
    assert e2e.cd.ctr("task", "kill", "-s", "SIGKILL", cid).returncode == 0
    e2e.cd.wait_status(cid, ("STOPPED",))
    e2e.remove(cid, expect_exit=137)
