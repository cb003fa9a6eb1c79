"""The one place that waits for children.

The shim is a child subreaper: container processes are re-parented to it
when runc exits, and every exit has to reach the process object that owns
it. Nothing else in the shim may call ``wait``/``waitpid`` (a stray wait
would steal an exit status), so commands are started here too, with their
exit watched before the reaper can possibly see it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger("containerd_shim")

__all__ = ["Exit", "ExitWatch", "Reaper", "exit_status"]

# Exits of pids nobody watches yet are kept this many at most (oldest dropped).
_UNCLAIMED_LIMIT = 4096


def exit_status(wait_status: int) -> int:
    """containerd's exit status: the exit code, or 128 + signal for a killed process."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return 255


class Exit:
    """A process's end: pid, status (containerd's convention) and when (wall clock)."""

    __slots__ = ("exited_at", "pid", "status")

    def __init__(self, pid: int, status: int, exited_at: float) -> None:
        self.pid = pid
        self.status = status
        self.exited_at = exited_at

    def __repr__(self) -> str:
        return f"Exit(pid={self.pid}, status={self.status})"


class ExitWatch:
    """Waits for one pid's exit; callbacks run on the reaper thread."""

    __slots__ = ("_callbacks", "_done", "exit", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exit: Exit | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[Exit], None]] = []

    def wait(self, timeout: float | None = None) -> Exit | None:
        """The exit, or None if ``timeout`` passed first."""
        self._done.wait(timeout)
        return self.exit

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def add_callback(self, callback: Callable[[Exit], None]) -> None:
        """Call ``callback(exit)`` once the process has exited (at once if it has)."""
        with _CALLBACK_LOCK:
            if self.exit is None:
                self._callbacks.append(callback)
                return
        callback(self.exit)

    def _set(self, exit_: Exit) -> None:
        with _CALLBACK_LOCK:
            self.exit = exit_
            callbacks, self._callbacks = self._callbacks, []
        self._done.set()
        for callback in callbacks:
            try:
                callback(exit_)
            except Exception:
                log.exception("exit callback for pid %d failed", exit_.pid)


_CALLBACK_LOCK = threading.Lock()


class Reaper:
    """Reaps every child on a background thread and hands each exit to its watcher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: dict[int, ExitWatch] = {}
        self._unclaimed: OrderedDict[int, Exit] = OrderedDict()
        self._children = threading.Event()  # set whenever a child may exist
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
            self._thread.start()

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
        """Start ``argv`` (looked up in PATH) and return its exit watch.

        ``stdin``/``stdout``/``stderr`` are fds for the child's 0/1/2 (None:
        /dev/null); ``pass_fds`` maps child fd numbers to our fds. Every
        other descriptor of ours is close-on-exec, so the child gets nothing else.
        """
        devnull = -1
        actions: list[tuple[int, int, int]] = []
        try:
            targets = {0: stdin, 1: stdout, 2: stderr, **(pass_fds or {})}
            if any(fd is None for fd in targets.values()):
                devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            for child_fd, fd in targets.items():
                actions.append((os.POSIX_SPAWN_DUP2, devnull if fd is None else fd, child_fd))
            with self._lock:
                pid = os.posix_spawnp(
                    argv[0],
                    list(argv),
                    dict(os.environ if env is None else env),
                    file_actions=actions,
                    setsid=new_session,
                    setsigmask=(),
                    # Python ignores these; ignored signals survive exec, and a
                    # container should not start with SIGPIPE ignored.
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                )
                watch = self._watches[pid] = ExitWatch(pid)
                self._children.set()
        finally:
            if devnull != -1:
                os.close(devnull)
        return watch

    def watch(self, pid: int, *, since: float = 0.0) -> ExitWatch:
        """Watch a pid we did not spawn directly (a container process re-parented to us).

        An exit of that pid already reaped at or after ``since`` (wall clock) is
        delivered at once; older ones belong to an earlier process with the same pid.
        """
        with self._lock:
            existing = self._watches.get(pid)
            if existing is not None:
                return existing
            watch = ExitWatch(pid)
            early = self._unclaimed.pop(pid, None)
            if early is None or early.exited_at < since:
                self._watches[pid] = watch
                self._children.set()
                return watch
        watch._set(early)
        return watch

    def _run(self) -> None:
        while True:
            self._children.clear()
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                self._children.wait()
                continue
            except InterruptedError:
                continue
            exit_ = Exit(pid, exit_status(status), time.time())
            with self._lock:
                watch = self._watches.pop(pid, None)
                if watch is None:
                    self._unclaimed[pid] = exit_
                    while len(self._unclaimed) > _UNCLAIMED_LIMIT:
                        self._unclaimed.popitem(last=False)
            if watch is not None:
                watch._set(exit_)
