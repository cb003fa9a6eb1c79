"""Shim building blocks that need no container: reaper, flags, addresses, events, log format."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import traceback
from collections.abc import Callable

import pytest
from google.protobuf.empty_pb2 import Empty

import ttrpc.blocking
from containerd_shim.api.events.task_pb2 import TaskExit, TaskStart
from containerd_shim.api.services.ttrpc.events.v1.events_pb2 import ForwardRequest
from containerd_shim.api.services.ttrpc.events.v1.events_ttrpc import EventsBlockingService
from containerd_shim.events import QUEUE_LIMIT, Publisher, any_of, queue_limit_from_env
from containerd_shim.flags import parse
from containerd_shim.manager import socket_address
from containerd_shim.reaper import Reaper, exit_status
from containerd_shim.serve import ContainerdLogHandler
from containerd_shim.service import validate_id
from ttrpc import Code, Context, RpcError


def in_child(fn: Callable[[Reaper], None]) -> Callable[[], None]:
    """Run a reaper test in a forked child: a reaper waits for *every* child of its
    process, so it must not run inside pytest, whose other tests wait for theirs."""

    def run() -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                reaper = Reaper()
                reaper.start()
                fn(reaper)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "reaper check failed (see stderr)"

    run.__name__ = fn.__name__
    return run


@in_child
def test_reaper_reports_exit_codes_and_signals(reaper: Reaper) -> None:
    ok = reaper.spawn(["/bin/sh", "-c", "exit 7"])
    killed = reaper.spawn(["/bin/sh", "-c", "kill -9 $$"])
    first = ok.wait(10)
    second = killed.wait(10)
    assert first is not None and first.status == 7
    assert second is not None and second.status == 128 + 9


@in_child
def test_reaper_keeps_early_exits_for_late_watchers(reaper: Reaper) -> None:
    # A grandchild re-parented to us would be watched only after it may have exited:
    # simulate with a process spawned behind the reaper's back.
    since = time.time()
    pid = os.posix_spawn("/bin/true", ["/bin/true"], dict(os.environ))
    reaper._children.set()  # the reaper learns about children from spawn(); this one is foreign
    watch = reaper.watch(pid, since=since)
    exit_ = watch.wait(10)
    assert exit_ is not None and exit_.status == 0 and exit_.pid == pid


@in_child
def test_reaper_ignores_stale_exits_of_reused_pids(reaper: Reaper) -> None:
    pid = os.posix_spawn("/bin/true", ["/bin/true"], dict(os.environ))
    reaper._children.set()
    end = time.monotonic() + 10
    while pid not in reaper._unclaimed:
        assert time.monotonic() < end
        time.sleep(0.01)
    watch = reaper.watch(pid, since=time.time() + 1)  # a later process with the same pid
    assert not watch.done
    reaper._watches.pop(pid, None)


def test_exit_status_convention() -> None:
    assert exit_status(0) == 0
    assert exit_status(3 << 8) == 3
    assert exit_status(9) == 137


def test_flags_in_go_syntax() -> None:
    f = parse(
        [
            "-namespace",
            "ns",
            "--address",
            "/run/c.sock",
            "-publish-binary=/usr/bin/containerd",
            "-id",
            "abc",
            "-debug",
            "start",
        ]
    )
    assert (f.namespace, f.address, f.publish_binary, f.id, f.debug, f.action) == (
        "ns",
        "/run/c.sock",
        "/usr/bin/containerd",
        "abc",
        True,
        "start",
    )
    f = parse(["-namespace", "ns", "-id", "x", "-bundle", "/b", "delete"])
    assert f.bundle == "/b" and f.action == "delete"
    assert parse(["-namespace", "ns"]).action == ""
    with pytest.raises(SystemExit):
        parse(["-bogus", "1"])


def test_socket_address_is_containerds() -> None:
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/default/c1").hexdigest()
    assert socket_address("/run/containerd/containerd.sock", "default", "c1") == (
        f"unix:///run/containerd/s/{digest}"
    )


@pytest.mark.parametrize(
    "bad", ["", "../x", "a/b", "a..b", "-a", "a-", "a" * 77, "x y", "a\0b", "a\n", "é", "a٣"]
)
def test_ids_are_validated(bad: str) -> None:
    with pytest.raises(RpcError) as err:
        validate_id(bad)
    assert err.value.code == Code.INVALID_ARGUMENT


def test_good_ids() -> None:
    for good in ["a", "abc-1", "a.b_c-d", "A" * 76]:
        assert validate_id(good) == good


class Collector(EventsBlockingService):
    def __init__(self) -> None:
        self.got: list[ForwardRequest] = []
        self.cond = threading.Condition()

    def Forward(self, request: ForwardRequest, ctx: Context | None = None) -> Empty:
        with self.cond:
            self.got.append(request)
            self.cond.notify_all()
        return Empty()

    def wait_for(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n, 15)


def test_any_uses_bare_message_name() -> None:
    assert any_of(TaskStart()).type_url == "containerd.events.TaskStart"


def test_publisher_forwards_in_order_and_survives_a_late_server(sock_dir: str) -> None:
    address = f"unix://{sock_dir}/events.sock"
    publisher = Publisher(address, "ns")  # nothing listens yet: events wait and are retried
    try:
        for i in range(5):
            publisher.publish("/tasks/exit", TaskExit(container_id=f"c{i}"))
        collector = Collector()
        server = ttrpc.blocking.Server()
        server.register(collector)
        server.start(address)
        try:
            collector.wait_for(5)
            envelopes = [r.envelope for r in collector.got]
            assert [e.topic for e in envelopes] == ["/tasks/exit"] * 5
            assert {e.namespace for e in envelopes} == {"ns"}
            assert [TaskExit.FromString(e.event.value).container_id for e in envelopes] == [
                f"c{i}" for i in range(5)
            ]
            assert all(e.event.type_url == "containerd.events.TaskExit" for e in envelopes)
            assert publisher.flush(10)
        finally:
            server.close()
    finally:
        publisher.close(timeout=1)


def test_publisher_queue_is_bounded(sock_dir: str) -> None:
    publisher = Publisher(f"unix://{sock_dir}/nobody.sock", "ns", queue_limit=10)
    try:
        for i in range(100):
            publisher.publish("/tasks/oom", TaskExit(container_id=str(i)))
        assert len(publisher._queue) <= 10
        # The newest are kept.
        assert TaskExit.FromString(publisher._queue[-1].event.value).container_id == "99"
    finally:
        publisher.close(timeout=0.1)


def test_publisher_gives_up_an_event_pushed_out_while_it_retries(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens: the sender retries c0 while c1..c5 push it (and c1, c2) out of the
    # queue of 3. The events that reach a server are the newest three, nothing more.
    address = f"unix://{sock_dir}/late.sock"
    publisher = Publisher(address, "ns", queue_limit=3)
    try:
        with caplog.at_level("WARNING", logger="containerd_shim"):
            publisher.publish("/tasks/exit", TaskExit(container_id="c0"))
            deadline = time.monotonic() + 10
            while not any("attempt 1" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the first attempt never failed"
                time.sleep(0.01)
            for i in range(1, 6):
                publisher.publish("/tasks/exit", TaskExit(container_id=f"c{i}"))
        collector = Collector()
        server = ttrpc.blocking.Server()
        server.register(collector)
        server.start(address)
        try:
            collector.wait_for(3)
            assert publisher.flush(10)
            got = [TaskExit.FromString(r.envelope.event.value).container_id for r in collector.got]
            assert got == ["c3", "c4", "c5"]
        finally:
            server.close()
    finally:
        publisher.close(timeout=1)


def test_publisher_redials_a_restarted_server_at_once(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    # containerd restarted since the last event: the old connection is dead, which is no
    # failed attempt (no warning, no backoff), as with Go's publisher.
    address = f"unix://{sock_dir}/events.sock"
    publisher = Publisher(address, "ns")
    try:
        for round_ in range(2):
            collector = Collector()
            server = ttrpc.blocking.Server()
            server.register(collector)
            server.start(address)
            try:
                with caplog.at_level("WARNING", logger="containerd_shim"):
                    publisher.publish("/tasks/start", TaskStart(container_id=f"c{round_}"))
                    collector.wait_for(1)
                    assert publisher.flush(10)
            finally:
                server.close()
        assert not caplog.records, [r.getMessage() for r in caplog.records]
    finally:
        publisher.close(timeout=1)


@pytest.mark.parametrize(
    ("value", "limit"),
    [
        (None, QUEUE_LIMIT),
        ("8", 8),
        (" 3 ", 3),
        ("", QUEUE_LIMIT),
        ("0", QUEUE_LIMIT),
        ("-2", QUEUE_LIMIT),
        ("many", QUEUE_LIMIT),
    ],
)
def test_queue_limit_from_env(
    value: str | None, limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv("PYRUNC_EVENT_QUEUE_LIMIT", raising=False)
    else:
        monkeypatch.setenv("PYRUNC_EVENT_QUEUE_LIMIT", value)
    assert queue_limit_from_env() == limit


def test_log_lines_in_containerd_format() -> None:
    import logging

    r, w = os.pipe()
    try:
        handler = ContainerdLogHandler(w, {"runtime": "io.containerd.pyrunc.v2", "id": "c 1"})
        record = logging.LogRecord("x", logging.WARNING, "", 0, 'say "hi"', (), None)
        handler.emit(record)
        line = os.read(r, 4096).decode()
    finally:
        os.close(r)
        os.close(w)
    assert line.startswith('time="')
    assert 'level=warning msg="say \\"hi\\"" id="c 1" runtime=io.containerd.pyrunc.v2\n' in line
