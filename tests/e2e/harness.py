"""Per-test helpers: run containers for one runtime, background processes with bounded waits."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pty
import re
import subprocess
import termios
import threading
import time
import tty as tty_mod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .containerd import Containerd, E2EError, process_alive, wait_for

Source = Literal["image", "rootfs"]

_counter = itertools.count(1)


def slug(text: str, limit: int = 24) -> str:
    """A containerd-identifier-safe piece of ``text``."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return cleaned[:limit].strip("-") or "t"


def _make_transparent(fd: int) -> None:
    """Raw mode without ONLCR: ctr's SetRaw turns OPOST back on, which with ONLCR still set
    would turn the container's \r\n into \r\r\n on our side."""
    tty_mod.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[1] &= ~termios.ONLCR
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class Stream:
    """Bytes read from one fd by a thread, with bounded waits for content."""

    def __init__(self, fd: int, name: str) -> None:
        self.name = name
        self._buf = bytearray()
        self._cond = threading.Condition()
        self.eof = False
        self._thread = threading.Thread(target=self._pump, args=(fd,), daemon=True)
        self._thread.start()

    def _pump(self, fd: int) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO on a pty once the other side is gone
                chunk = b""
            with self._cond:
                if not chunk:
                    self.eof = True
                    self._cond.notify_all()
                    return
                self._buf += chunk
                self._cond.notify_all()

    @property
    def data(self) -> bytes:
        with self._cond:
            return bytes(self._buf)

    def seen(self, needle: bytes, timeout: float) -> bool:
        """Wait up to ``timeout`` for ``needle``; False if it did not come (or EOF came)."""
        start = 0

        def found() -> bool:
            nonlocal start
            if self._buf.find(needle, start) >= 0:
                return True
            start = max(0, len(self._buf) - len(needle) + 1)
            return self.eof

        with self._cond:
            self._cond.wait_for(found, timeout=timeout)
            return self._buf.find(needle) >= 0

    def wait_eof(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.eof, timeout=timeout)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)


class Background:
    """A child process whose stdout and stderr (separately, or merged in a pty) are collected."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdin_pipe: bool = False,
        tty: bool = False,
    ) -> None:
        self.argv = list(argv)
        self._master: int | None = None
        self._err: Stream | None = None
        if tty:
            master, slave = pty.openpty()
            _make_transparent(slave)
            self._master = master
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    env=env,
                    start_new_session=True,
                )
            finally:
                os.close(slave)
            self._out = Stream(master, "pty")
        else:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self._out = Stream(self.proc.stdout.fileno(), "stdout")
            self._err = Stream(self.proc.stderr.fileno(), "stderr")

    @property
    def output(self) -> bytes:
        """Everything on stdout (or the pty) so far."""
        return self._out.data

    @property
    def errors(self) -> bytes:
        """Everything on stderr so far (empty with a pty)."""
        return self._err.data if self._err is not None else b""

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def describe(self) -> str:
        return (
            f"{' '.join(self.argv)}\nexit: {self.proc.poll()}\n"
            f"stdout ({len(self.output)} bytes): {self.output[-1000:]!r}\n"
            f"stderr: {self.errors[-1000:]!r}"
        )

    def seen(self, needle: str | bytes, timeout: float) -> bool:
        """Wait up to ``timeout`` for ``needle`` on stdout; False if it did not come."""
        return self._out.seen(needle.encode() if isinstance(needle, str) else needle, timeout)

    def wait_output(self, needle: str | bytes, timeout: float) -> None:
        if not self.seen(needle, timeout):
            raise E2EError(f"{needle!r} not seen within {timeout}s in\n{self.describe()}")

    def wait_errors(self, needle: str | bytes, timeout: float) -> None:
        """Wait for ``needle`` on stderr."""
        want = needle.encode() if isinstance(needle, str) else needle
        if self._err is None or not self._err.seen(want, timeout):
            raise E2EError(f"{want!r} not seen on stderr within {timeout}s in\n{self.describe()}")

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def wait(self, timeout: float) -> int:
        """Wait for exit and for all output; kill and fail on timeout."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise E2EError(f"still running after {timeout}s:\n{self.describe()}") from None
        for stream in (self._out, self._err):
            if stream is not None:
                stream.wait_eof(timeout=10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        for stream in (self._out, self._err):
            if stream is not None:
                stream.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.close(self._master)
            self._master = None


END_MARK = b"<<e2e-end>>"


def held(script: str, *, exit_code: int = 0) -> tuple[str, str, str]:
    """``sh -c`` running ``script``, then printing END_MARK and staying alive until released
    with SIGUSR1, when it exits with ``exit_code``.

    ctr 1.6 closes its ends of the stdout/stderr fifos as soon as it learns the exit status,
    and Go's shim reports an exit without waiting for its pipe-to-fifo copy: output still in
    flight when a process exits is lost now and then on a loaded machine. Tests that check
    output therefore read all of it while the process still lives.
    """
    trap = f"trap 'kill $! 2>/dev/null; exit {exit_code}' USR1"
    return ("/bin/sh", "-c", f"{trap}; {script}; echo '{END_MARK.decode()}'; sleep 1000 & wait")


@dataclass
class Held:
    """A ``ctr run`` or ``ctr task exec`` in the background whose process waits for release."""

    cd: Containerd
    proc: Background
    cid: str
    exec_id: str | None = None

    def output(self, timeout: float = 30) -> bytes:
        """Stdout up to the end mark (waits for the mark)."""
        self.proc.wait_output(END_MARK, timeout)
        out = self.proc.output
        return out[: out.index(END_MARK)]

    def release(self) -> None:
        exec_flag = ("--exec-id", self.exec_id) if self.exec_id else ()
        res = self.cd.ctr("task", "kill", "--signal", "SIGUSR1", *exec_flag, self.cid)
        assert res.returncode == 0, self.cd.explain(res, f"could not release {self.cid}")

    def finish(self, timeout: float = 30) -> int:
        """Release the process and return ctr's exit status."""
        self.output(timeout)
        self.release()
        return self.proc.wait(timeout)


@dataclass
class E2E:
    """What a test needs to run containers with one runtime against the session containerd."""

    cd: Containerd
    runtime: str
    image: str
    rootfs: Path
    name: str
    ids: list[str] = field(default_factory=list)
    procs: list[Background] = field(default_factory=list)

    def new_id(self) -> str:
        cid = f"{self.name}-{os.getpid()}-{next(_counter)}"
        self.ids.append(cid)
        return self.cd.track(cid)

    def run_args(
        self, cid: str, *cmd: str, flags: Sequence[str] = (), source: Source = "image"
    ) -> list[str]:
        """``ctr run`` for this runtime; ``source`` picks the image (mounts) or a plain rootfs."""
        ref = ["--rootfs", str(self.rootfs)] if source == "rootfs" else [self.image]
        return ["run", "--runtime", self.runtime, *flags, *ref, cid, *cmd]

    def run_argv(
        self, cid: str, *cmd: str, flags: Sequence[str] = (), source: Source = "image"
    ) -> list[str]:
        """The full argv of ``ctr run`` (for background processes)."""
        return self.cd.ctr_argv(*self.run_args(cid, *cmd, flags=flags, source=source))

    def run(
        self,
        *cmd: str,
        flags: Sequence[str] = (),
        source: Source = "image",
        timeout: float = 30,
        cid: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr run --rm`` a container to completion (stdin: /dev/null)."""
        cid = cid or self.new_id()
        args = self.run_args(cid, *cmd, flags=("--rm", *flags), source=source)
        return self.cd.ctr(*args, timeout=timeout)

    def background(
        self, argv: Sequence[str], *, stdin_pipe: bool = False, tty: bool = False
    ) -> Background:
        proc = Background(argv, env=self.cd.env(), stdin_pipe=stdin_pipe, tty=tty)
        self.procs.append(proc)
        return proc

    def run_held(
        self,
        script: str,
        *,
        exit_code: int = 0,
        flags: Sequence[str] = (),
        source: Source = "image",
        tty: bool = False,
        stdin_pipe: bool = False,
    ) -> Held:
        """``ctr run --rm`` of ``held(script)`` in the background."""
        cid = self.new_id()
        argv = self.run_argv(
            cid, *held(script, exit_code=exit_code), flags=("--rm", *flags), source=source
        )
        return Held(self.cd, self.background(argv, tty=tty, stdin_pipe=stdin_pipe), cid)

    def exec_held(
        self, cid: str, exec_id: str, script: str, *, exit_code: int = 0, stdin_pipe: bool = False
    ) -> Held:
        """``ctr task exec`` of ``held(script)`` in the background."""
        argv = self.cd.ctr_argv(
            "task", "exec", "--exec-id", exec_id, cid, *held(script, exit_code=exit_code)
        )
        return Held(self.cd, self.background(argv, stdin_pipe=stdin_pipe), cid, exec_id)

    def start(
        self, *cmd: str, flags: Sequence[str] = (), source: Source = "image", cid: str | None = None
    ) -> str:
        """``ctr run -d`` a container and wait until its task is RUNNING."""
        cid = cid or self.new_id()
        res = self.cd.ctr(*self.run_args(cid, *cmd, flags=("-d", *flags), source=source))
        assert res.returncode == 0, self.cd.explain(res, f"ctr run -d {cid} failed")
        self.cd.wait_status(cid, ("RUNNING",))
        return cid

    def remove(self, cid: str, *, expect_exit: int | None = None) -> None:
        """Delete a stopped task (checking its exit code) and its container."""
        res = self.cd.ctr("task", "delete", cid)
        assert res.returncode == 0, self.cd.explain(res, f"task delete {cid} failed")
        if expect_exit is not None:
            assert deleted_exit_status(res.stderr) == expect_exit, self.cd.explain(
                res, f"task {cid}: expected exit status {expect_exit}"
            )
        assert self.cd.task_status(cid) is None, f"task {cid} still listed after delete"
        res = self.cd.ctr("container", "delete", cid)
        assert res.returncode == 0, self.cd.explain(res, f"container delete {cid} failed")

    def containers(self) -> set[str]:
        res = self.cd.ctr("container", "ls", "-q", check=True)
        return set(res.stdout.split())

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.close()
        if not self.cd.running:
            return  # the session teardown cleans up after a dead containerd
        with contextlib.suppress(E2EError):
            existing = self.containers()
            for cid in self.ids:
                if cid in existing:
                    self.cd.force_remove(cid)


def deleted_exit_status(stderr: str) -> int:
    """The exit status ``ctr task delete`` reports: ctr 1.6 exits 0 and only logs a warning
    ("task ID exit with non-zero exit code N") when the status is not 0."""
    match = re.search(r"exit with non-zero exit code (\d+)", stderr)
    return int(match.group(1)) if match else 0


def wait_gone(cd: Containerd, pid: int, timeout: float = 10) -> None:
    """Wait until ``pid`` no longer runs (absent or a zombie)."""
    wait_for(
        lambda: not process_alive(pid),
        timeout=timeout,
        what=f"pid {pid} to exit",
        describe=cd.log_tail,
    )


@dataclass
class Event:
    namespace: str
    topic: str
    body: dict[str, Any]


_EVENT_LINE = re.compile(r"^(?P<ts>.+?) (?P<ns>\S+) (?P<topic>/\S+)(?: (?P<body>\{.*\}))?$")


class EventStream:
    """``ctr events`` in the background, subscribed before ``__init__`` returns."""

    def __init__(self, e2e: E2E) -> None:
        self.cd = e2e.cd
        self.proc = e2e.background(self.cd.ctr_argv("events"))
        self._syncs = itertools.count(1)
        self.sync()

    def sync(self, timeout: float = 15) -> None:
        """Make sure every event published so far has been printed (and we are subscribed):
        label our namespace with a fresh token and wait for its /namespaces/update event."""
        deadline = time.monotonic() + timeout
        while True:
            token = f"sync-{os.getpid()}-{next(self._syncs)}"
            self.cd.ctr("namespaces", "label", self.cd.namespace, f"e2e-sync={token}", check=True)
            if self.proc.seen(token, timeout=0.5):
                return
            if time.monotonic() > deadline:
                raise E2EError(f"ctr events never showed {token}: {self.proc.text[-2000:]}")

    def events(self, namespace: str | None = None) -> list[Event]:
        ns = namespace or self.cd.namespace
        found = []
        for line in self.proc.text.splitlines():
            match = _EVENT_LINE.match(line)
            if match and match["ns"] == ns:
                body = json.loads(match["body"]) if match["body"] else {}
                found.append(Event(ns, match["topic"], body))
        return found

    def task_events(self, container_id: str) -> list[Event]:
        """The /tasks/* events of one container, in arrival order."""
        return [
            ev
            for ev in self.events()
            if ev.topic.startswith("/tasks/") and ev.body.get("container_id") == container_id
        ]
