"""The v1 shim service inside the calling process (the client's ``local()``).

A shim process owns all of its children and reaps them with ``waitpid(-1)``
(:class:`containerd_shim.reaper.Reaper`). A library running inside somebody
else's program cannot: that would steal the exit statuses of the program's own
children (``subprocess`` and the like). :class:`ScopedReaper` therefore waits
for the processes it was asked about only, each through a pidfd, and leaves
every other child alone.

Container processes are re-parented to their nearest "child subreaper" when
runc exits, so :func:`local_service` makes the calling process one
(``PR_SET_CHILD_SUBREAPER``): without it their exit statuses would go to init.
A consequence to know about: orphans of the container that nobody watches
(descendants of a container sharing the host's pid namespace) stay zombies
of this process until it exits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import time
from collections.abc import Callable, Mapping, Sequence

from google.protobuf.message import Message

from containerd_shim.reaper import Exit, ExitWatch, Reaper
from containerd_shim.v1 import ShimConfig, ShimV1Service

log = logging.getLogger("containerd_shim")

__all__ = ["LocalShim", "ScopedReaper", "local_service"]

_UNKNOWN_STATUS = 255


class ScopedReaper(Reaper):
    """A reaper that waits for watched pids only (one pidfd each), never ``waitpid(-1)``."""

    def __init__(self) -> None:
        super().__init__()
        self._pidfds: dict[int, int] = {}  # pidfd -> pid
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closed = False

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        pass_fds: Mapping[int, int] | None = None,
        env: Mapping[str, str] | None = None,
        new_session: bool = False,
    ) -> ExitWatch:
        watch = super().spawn(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=pass_fds,
            env=env,
            new_session=new_session,
        )
        # Not reaped by anyone until we do: the pid cannot be reused before pidfd_open.
        self._track(watch)
        return watch

    def watch(self, pid: int, *, since: float = 0.0) -> ExitWatch:
        watch = super().watch(pid, since=since)
        if not watch.done:
            self._track(watch)
        return watch

    def _track(self, watch: ExitWatch) -> None:
        with self._lock:
            if watch.pid in self._pidfds.values():
                return  # watched already
        try:
            fd = os.pidfd_open(watch.pid)
        except ProcessLookupError:
            # Reaped by somebody else already: the status is gone.
            log.warning("pid %d vanished before it could be watched", watch.pid)
            self._deliver(watch.pid, _UNKNOWN_STATUS)
            return
        with self._lock:
            self._pidfds[fd] = watch.pid
        os.eventfd_write(self._wake, 1)

    def _deliver(self, pid: int, status: int) -> None:
        with self._lock:
            watch = self._watches.pop(pid, None)
        if watch is not None:
            watch._set(Exit(pid, status, time.time()))

    def _run(self) -> None:
        while True:
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            with self._lock:
                if self._closed:
                    return
                for fd in self._pidfds:
                    poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == self._wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                    continue
                self._reap(fd)

    def _reap(self, fd: int) -> None:
        with self._lock:
            pid = self._pidfds.pop(fd)
        status = _UNKNOWN_STATUS
        try:
            result = os.waitid(os.P_PIDFD, fd, os.WEXITED)
        except ChildProcessError:
            # Not our child (we were not its subreaper): its status went elsewhere.
            log.warning("pid %d exited but is not our child: exit status unknown", pid)
        else:
            if result is not None:
                if result.si_code == os.CLD_EXITED:
                    status = result.si_status
                else:  # killed or dumped
                    status = 128 + result.si_status
        finally:
            os.close(fd)
        self._deliver(pid, status)

    def close(self) -> None:
        """Stop the reaper thread; unwatched processes are left alone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fds, self._pidfds = list(self._pidfds), {}
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(5)
        for fd in fds:
            os.close(fd)
        os.close(self._wake)


class _Discard:
    def publish(self, topic: str, event: Message, namespace: str | None = None) -> None:
        log.debug("local shim event %s (no publisher)", topic)


class LocalShim:
    """A v1 shim service running in this process, and what it needs to run."""

    def __init__(
        self, config: ShimConfig, publish: Callable[[str, Message], object] | None = None
    ) -> None:
        from containerd_shim.serve import io_factory, set_subreaper

        try:
            set_subreaper()
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        self.reaper = ScopedReaper()
        self.reaper.start()
        sink = _Discard() if publish is None else _Callback(publish)
        self.service = ShimV1Service(
            config,
            reaper=self.reaper,
            publisher=sink,
            make_io=io_factory(self.reaper, work_dir=config.path),
        )

    def close(self) -> None:
        """Kill and delete the container (if any), then stop reaping (idempotent)."""
        try:
            self.service.stop()
        finally:
            self.reaper.close()


class _Callback:
    def __init__(self, publish: Callable[[str, Message], object]) -> None:
        self._publish = publish

    def publish(self, topic: str, event: Message, namespace: str | None = None) -> None:
        self._publish(topic, event)


def local_service(
    config: ShimConfig, publish: Callable[[str, Message], object] | None = None
) -> LocalShim:
    """Run the v1 shim service in this process; ``publish(topic, event)`` gets its events."""
    return LocalShim(config, publish)
