"""Publishing task events to containerd.

Events go to containerd's ttrpc socket (``TTRPC_ADDRESS``) with
``containerd.services.events.ttrpc.v1.Events/Forward``, one at a time and
in order, from a single thread. The queue is bounded: when containerd is
away for long, the oldest events are dropped (with a log line) rather than
blocking the shim or growing without limit. Failed sends are retried with
backoff (:data:`MAX_ATTEMPTS` over about 7 s per event, counted from when it
reaches the head of the queue), so a containerd restart loses nothing the queue
could hold. The bound is :data:`QUEUE_LIMIT` events; the shim daemons read
``PYRUNC_EVENT_QUEUE_LIMIT`` (a positive integer) at start to change it.

The v1 shim publishes the same way through a binary instead
(:class:`BinaryPublisher`: ``containerd --address A publish --topic T
--namespace NS`` with the event on stdin). With no address (a shim run
without containerd, e.g. by ``pyshim``) events are dropped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

import ttrpc.blocking
from containerd_shim.api.services.ttrpc.events.v1.events_pb2 import Envelope, ForwardRequest
from containerd_shim.api.services.ttrpc.events.v1.events_ttrpc import EventsBlockingClient
from ttrpc import ConnectionClosed, Context, RpcError

if TYPE_CHECKING:
    from containerd_shim.reaper import Reaper

log = logging.getLogger("containerd_shim")

__all__ = ["BinaryPublisher", "PublishError", "Publisher", "any_of", "queue_limit_from_env"]

QUEUE_LIMIT = 1024
QUEUE_LIMIT_ENV = "PYRUNC_EVENT_QUEUE_LIMIT"
SEND_TIMEOUT = 5.0
MAX_ATTEMPTS = 8


class PublishError(Exception):
    """One attempt to deliver an event failed."""


def queue_limit_from_env() -> int:
    """The event queue's bound: ``PYRUNC_EVENT_QUEUE_LIMIT`` if set to a positive integer
    (anything else is logged and ignored), else :data:`QUEUE_LIMIT`."""
    value = os.environ.get(QUEUE_LIMIT_ENV, "").strip()
    if not value:
        return QUEUE_LIMIT
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        log.warning(
            "%s=%r is not a positive integer: using %d", QUEUE_LIMIT_ENV, value, QUEUE_LIMIT
        )
        return QUEUE_LIMIT
    return limit


def any_of(message: Message) -> Any:
    """Pack an event the way containerd's typeurl does: the type URL is the bare message name."""
    return Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


class Publisher:
    """Forwards events to containerd from a background thread."""

    def __init__(self, address: str, namespace: str, *, queue_limit: int | None = None) -> None:
        """``queue_limit`` None: :func:`queue_limit_from_env`."""
        self.address = address
        self.namespace = namespace
        self._queue: collections.deque[Envelope] = collections.deque()
        self._limit = queue_limit_from_env() if queue_limit is None else queue_limit
        self._cond = threading.Condition()
        self._closed = False
        self._idle = threading.Event()
        self._idle.set()
        self._conn: ttrpc.blocking.Client | None = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def publish(self, topic: str, event: Message, namespace: str | None = None) -> None:
        """Queue an event; never blocks."""
        if not self.address:
            log.debug("no containerd to publish %s to", topic)
            return
        stamp = Timestamp()
        stamp.GetCurrentTime()
        envelope = Envelope(
            timestamp=stamp, namespace=namespace or self.namespace, topic=topic, event=any_of(event)
        )
        with self._cond:
            if self._closed:
                return
            if len(self._queue) >= self._limit:
                dropped = self._queue.popleft()
                log.error("event queue full: dropping the oldest event (%s)", dropped.topic)
            self._queue.append(envelope)
            self._idle.clear()
            self._cond.notify()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been sent (or given up on)."""
        return self._idle.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout``), then stop."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(1)
        if self._conn is not None:
            self._conn.close()

    def _prepare(self) -> None:
        """Dial containerd before the first event, as Go's shims do: the task's first event
        (/tasks/create) then goes out without waiting for a connection. Failures are left
        to the first send, which dials again."""
        if not self.address:
            return
        try:
            self._conn = ttrpc.blocking.connect(self.address, timeout=SEND_TIMEOUT)
        except (OSError, ValueError) as exc:
            log.debug("events: containerd not reachable yet: %s", exc)

    def _run(self) -> None:
        self._prepare()
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._idle.set()
                    self._cond.wait()
                if self._closed:
                    self._idle.set()
                    return
                envelope = self._queue[0]
            self._send(envelope)
            with self._cond:
                if self._queue and self._queue[0] is envelope:
                    self._queue.popleft()

    def _deliver(self, envelope: Envelope) -> None:
        """Send one event (one attempt); raise on failure."""
        request = ForwardRequest(envelope=envelope)
        if self._conn is not None and not self._conn.closed:
            try:
                EventsBlockingClient(self._conn).Forward(request, Context(timeout=SEND_TIMEOUT))
                return
            except ConnectionClosed:
                # containerd went away since the last event (a restart): dial it again at
                # once, as Go's publisher does, rather than count a failed attempt.
                self._conn.close()
        self._conn = ttrpc.blocking.connect(self.address, timeout=SEND_TIMEOUT)
        EventsBlockingClient(self._conn).Forward(request, Context(timeout=SEND_TIMEOUT))

    def _send(self, envelope: Envelope) -> None:
        delay = 0.1
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                self._deliver(envelope)
                return
            except (OSError, RpcError, PublishError) as exc:
                log.warning("publish %s (attempt %d) failed: %s", envelope.topic, attempt, exc)
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                with self._cond:
                    if self._closed:
                        return
                time.sleep(delay)  # backoff between retries, not synchronisation
                delay = min(delay * 2, 2.0)
                with self._cond:
                    if not self._queue or self._queue[0] is not envelope:
                        return  # pushed out of the full queue meanwhile (and logged): dropped
        log.error("dropping event %s after %d attempts", envelope.topic, MAX_ATTEMPTS)


class BinaryPublisher(Publisher):
    """Publishes through containerd's ``publish`` command, as the v1 shim does.

    Each event runs ``BINARY --address ADDRESS publish --topic T --namespace NS``
    with the event (a serialized ``Any``) on stdin, through the shim's reaper:
    the reaper alone waits for children.
    """

    def __init__(
        self,
        binary: str,
        address: str,
        namespace: str,
        reaper: Reaper,
        *,
        queue_limit: int | None = None,
        timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.binary = binary
        self.reaper = reaper
        self.timeout = timeout
        super().__init__(address, namespace, queue_limit=queue_limit)

    def _prepare(self) -> None:
        pass  # one command per event: nothing to dial

    def _deliver(self, envelope: Envelope) -> None:
        argv = [self.binary, "--address", self.address, "publish", "--topic", envelope.topic]
        argv += ["--namespace", envelope.namespace]
        stdin = os.memfd_create("event", os.MFD_CLOEXEC)
        output = os.memfd_create("publish-output", os.MFD_CLOEXEC)
        try:
            os.write(stdin, envelope.event.SerializeToString())
            os.lseek(stdin, 0, os.SEEK_SET)
            watch = self.reaper.spawn(argv, stdin=stdin, stdout=output, stderr=output)
            exit_ = watch.wait(self.timeout)
            if exit_ is None:
                if not watch.done:  # not reaped yet: the pid is still our child's
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(watch.pid, 9)
                watch.wait()
                raise PublishError(f"{self.binary} publish: no answer in {self.timeout:.0f}s")
            if exit_.status != 0:
                os.lseek(output, 0, os.SEEK_SET)
                message = os.read(output, 4096).decode(errors="replace").strip()
                raise PublishError(f"{self.binary} publish: exit status {exit_.status}: {message}")
        finally:
            os.close(stdin)
            os.close(output)
