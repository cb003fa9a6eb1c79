"""Our shim's event queue while containerd is down: bounded, oldest dropped, never blocking.

A containerd of its own whose shims get ``PYRUNC_EVENT_QUEUE_LIMIT=8`` (read by our shim's
daemon at start; the default bound is 1024). With a task running, containerd is SIGKILLed
and the test drives the shim itself through its ttrpc socket (our shim client), as
containerd would: pause/resume pairs and one exec, 23 events for a queue of 8. Meanwhile
the test reads the shim's log fifo in the bundle, standing in for containerd, which reads
it when it runs (lines written with no reader are lost).

What must hold: every call answers while the events cannot leave (publishing never
blocks), each event pushed out of the full queue is logged, and after containerd
restarts it receives exactly the newest 8, in order; then containerd manages the task
as usual (kill, delete) and the shim exits.

Go's shim has no bound to lower (a 2048-slot channel, plus one goroutine per event being
retried): this test is for ours only.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from containerd_shim import client
from containerd_shim.api.runtime.v2.task import shim_pb2 as api
from containerd_shim.spec import process_spec
from ttrpc import Context

from .conftest import IMAGE_NAME, PY_RUNTIME, _prerequisites
from .containerd import Containerd, wait_for
from .harness import E2E, wait_gone

LIMIT = 8
PAIRS = 10
# What the shim publishes while containerd is down, in order (see the test).
PUBLISHED = ["/tasks/paused", "/tasks/resumed"] * PAIRS + [
    "/tasks/exec-added",
    "/tasks/exec-started",
    "/tasks/exit",
]
QUEUE_FULL = "event queue full: dropping the oldest event"
# A State call reads the shim's memory only: this is ample, even on a loaded machine.
PROMPT = 2.0


@pytest.fixture
def small_queue(namespace: str, rootfs: Path) -> Iterator[E2E]:
    missing = _prerequisites()
    if missing:
        pytest.skip(missing)
    cd = Containerd.create(f"{namespace}-queue", extra_env={"PYRUNC_EVENT_QUEUE_LIMIT": str(LIMIT)})
    env = E2E(cd=cd, runtime=PY_RUNTIME, image=IMAGE_NAME, rootfs=rootfs, name="queue-pyrunc")
    try:
        cd.start()
        yield env
    finally:
        env.cleanup()
        cd.cleanup()


class LogFifo:
    """The reading end of a shim's ``log`` fifo, read without blocking."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._data = bytearray()

    @property
    def text(self) -> str:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 65536):
                self._data += chunk
        return self._data.decode(errors="replace")

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.timeout(90)
def test_full_event_queue_while_containerd_is_down(small_queue: E2E) -> None:
    e2e = small_queue
    cd = e2e.cd
    cid = e2e.start("/bin/sleep", "1000", source="rootfs")
    [shim_pid] = cd.shim_pids(cid)
    bundle = cd.bundle(cid)
    address = (bundle / "address").read_text().strip()

    cd.kill()
    log = LogFifo(bundle / "log")
    slowest_state = 0.0
    shim = client.connect_v2(address, container_id=cid, namespace=cd.namespace)
    try:

        def state() -> str:
            nonlocal slowest_state
            began = time.monotonic()
            status = shim.state(cid).status
            slowest_state = max(slowest_state, time.monotonic() - began)
            return status

        ctx = Context(timeout=10, metadata={"containerd-namespace-ttrpc": cd.namespace})
        for _ in range(PAIRS):
            shim.api.Pause(api.PauseRequest(id=cid), ctx)
            assert state() == "paused"
            shim.api.Resume(api.ResumeRequest(id=cid), ctx)
            assert state() == "running"
        shim.exec(cid, "newest", process_spec(["/bin/sh", "-c", "exit 42"]))
        shim.start(cid, "newest")
        assert shim.wait(cid, "newest", timeout=30).status == 42
        shim.delete(cid, "newest")
        assert state() == "running"
        assert shim.shim_pid() == shim_pid
    finally:
        shim.close()
    assert slowest_state < PROMPT, f"a State call took {slowest_state:.2f}s"

    # Each publish into the full queue pushed the oldest event out, with a line saying so
    # (written before the call that published answered).
    shim_log = log.text
    log.close()  # containerd opens the fifo again when it reconnects
    dropped = re.findall(QUEUE_FULL + r" \((\S+)\)", shim_log)
    assert dropped == PUBLISHED[: len(PUBLISHED) - LIMIT], (dropped, shim_log[-3000:])
    cd.start()

    cd.wait_status(cid, ("RUNNING",))
    assert cd.shim_pids(cid) == [shim_pid], "the shim was replaced instead of reconnected"
    wait_for(
        lambda: len(cd.forwarded_events()) >= LIMIT,
        timeout=30,
        what=f"the {LIMIT} queued events to reach containerd",
        describe=lambda: f"forwarded: {cd.forwarded_events()}\n{cd.log_tail()}",
    )

    res = cd.ctr("task", "kill", "--signal", "SIGKILL", cid)
    assert res.returncode == 0, cd.explain(res, "ctr task kill after the restart")
    cd.wait_status(cid, ("STOPPED",))
    e2e.remove(cid, expect_exit=137)
    wait_gone(cd, shim_pid)
    # Exactly the newest LIMIT events, in order, then the kill's exit and the delete.
    forwarded = cd.forwarded_events()
    expected = [*PUBLISHED[-LIMIT:], "/tasks/exit", "/tasks/delete"]
    assert forwarded == expected, f"forwarded {forwarded}\nexpected {expected}\n{cd.log_tail(80)}"
    assert QUEUE_FULL not in cd.log_since_start()
