"""``pyshim``: run a command in a container through a shim, with no containerd.

    pyshim run [--shim BINARY] [--v1] [--id ID] [--env K=V]... [--tty|--no-tty] ROOTFS -- CMD...

Makes a temporary bundle (a ``config.json`` for ROOTFS and CMD), starts the shim
with :mod:`containerd_shim.client` (ours by default, v2 protocol; ``--v1`` for the
v1 protocol; ``--shim`` for another binary such as Debian's Go shims), creates
and starts the container with stdio fifos that it copies to and from its own
stdin, stdout and stderr, waits, deletes the container, stops the shim and
removes the bundle. It prints nothing of its own and exits with the
container's exit status (128 + N for a signal), or 125 when the shim or the
container could not be run.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import queue
import select
import shutil
import signal
import stat
import struct
import sys
import tempfile
import termios
import threading
import tty as tty_mod
from collections.abc import Sequence
from typing import Any

from containerd_shim import client
from containerd_shim.spec import oci_spec
from ttrpc import RpcError

__all__ = ["main", "run"]

# The exit status when pyshim itself fails (as docker and podman use it).
FAILED = 125
DRAIN_TIMEOUT = 5.0
GO_V1_SHIM = "containerd-shim"  # Debian's Go v1 shim: speaks v1 whatever the flags say


def _own_shim(v1: bool) -> list[str]:
    return [sys.executable, "-m", "containerd_shim.v1" if v1 else "containerd_shim"]


def _shim_env() -> dict[str, str]:
    """Our environment, with this package importable by ``python -m`` shims."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(client.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    return env


# Guards the list of fds run() closes at the end against the stdin thread closing one early.
_FDS_LOCK = threading.Lock()


class _Copy(threading.Thread):
    """Copies ``src`` to ``dst`` until EOF (or stop()); fds are non-blocking-safe."""

    def __init__(self, src: int, dst: int, name: str, *, fifo_reader: bool = False) -> None:
        super().__init__(name=name, daemon=True)
        self.src = src
        self.dst = dst
        # A fifo we read: EOF only counts once a writer came and went (POLLHUP).
        self.fifo_reader = fifo_reader
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.eof = threading.Event()

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.src, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._stop_r in events:
                    return
                mask = events.get(self.src, 0)
                try:
                    data = os.read(self.src, 65536)
                except BlockingIOError:
                    continue
                except OSError:  # EIO from a terminal that went away
                    return
                if not data:
                    if self.fifo_reader and not mask & select.POLLHUP:
                        continue  # no writer yet
                    return
                self._write(data)
        finally:
            self.eof.set()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.dst, view)
            except BlockingIOError:
                select.select([], [self.dst], [])
                continue
            except OSError:
                return  # our reader went away: drop the rest
            view = view[n:]

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def close(self) -> None:
        self.stop()
        self.join(5)
        os.close(self._stop_r)
        os.close(self._stop_w)


def _terminal_size(fd: int) -> tuple[int, int] | None:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return cols, rows


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pyshim",
        description="Run containers through a containerd shim, without containerd.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run",
        help="run CMD in a container made of ROOTFS",
        description="Run CMD in a container whose root filesystem is the directory ROOTFS.",
        usage="pyshim run [OPTIONS] ROOTFS -- CMD [ARG...]",
        epilog="Exit status: the container's (128+N when killed by signal N), "
        "or 125 when pyshim could not run it.",
    )
    run_parser.add_argument("rootfs", metavar="ROOTFS", help="the container's root directory")
    run_parser.add_argument("cmd", metavar="CMD", nargs="+", help="the command and arguments")
    run_parser.add_argument(
        "--shim",
        metavar="BINARY",
        help="shim binary (default: ours; e.g. containerd-shim-runc-v2 or containerd-shim)",
    )
    run_parser.add_argument(
        "--v1",
        action="store_true",
        help="speak the v1 shim protocol (automatic for Go's containerd-shim)",
    )
    run_parser.add_argument("--id", default="", help="container id (default: pyshim-PID)")
    run_parser.add_argument("--namespace", default="pyshim", help="containerd namespace")
    run_parser.add_argument(
        "--env", "-e", action="append", default=[], metavar="KEY=VALUE", help="set a variable"
    )
    run_parser.add_argument("--cwd", default="/", help="working directory in the container")
    tty_group = run_parser.add_mutually_exclusive_group()
    tty_group.add_argument(
        "--tty", "-t", dest="tty", action="store_true", default=None, help="allocate a terminal"
    )
    tty_group.add_argument("--no-tty", dest="tty", action="store_false", help="no terminal")
    run_parser.add_argument("--debug", action="store_true", help="show the shim's log")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parse(sys.argv[1:] if argv is None else argv)
    try:
        return run(opts)
    except (client.ShimError, RpcError, OSError, ValueError, TimeoutError) as exc:
        message = exc.message if isinstance(exc, RpcError) else str(exc)
        print(f"pyshim: {message}", file=sys.stderr)
        return FAILED


def _stdin_usable() -> bool:
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


def run(opts: argparse.Namespace) -> int:
    """``pyshim run``: the container's exit status."""
    from containerd_shim.containers import validate_id

    container_id = opts.id or f"pyshim-{os.getpid()}"
    try:
        validate_id(container_id)
    except RpcError as exc:
        raise ValueError(exc.message) from None
    if not os.path.isdir(opts.rootfs):
        raise ValueError(f"{opts.rootfs}: not a directory")
    terminal = os.isatty(1) if opts.tty is None else bool(opts.tty)
    v1 = bool(opts.v1) or (opts.shim is not None and os.path.basename(opts.shim) == GO_V1_SHIM)
    binary: list[str] = [opts.shim] if opts.shim else _own_shim(v1)

    tmp = tempfile.mkdtemp(prefix="pyshim-", dir="/tmp")
    try:
        bundle = os.path.join(tmp, "bundle")
        os.mkdir(bundle, 0o711)
        spec = oci_spec(
            opts.rootfs,
            opts.cmd,
            env=opts.env,
            terminal=terminal,
            hostname=container_id,
            cwd=opts.cwd,
        )
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        return _run_in(tmp, bundle, container_id, binary, v1, terminal, opts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _start_shim(
    tmp: str, bundle: str, container_id: str, binary: list[str], v1: bool, opts: argparse.Namespace
) -> client.Shim:
    # No containerd: events go nowhere (our shims drop them without an address;
    # Go's v1 shim runs `true publish ...`).
    publish = shutil.which("true") or "/bin/true"
    if v1:
        config = client.ShimConfig(
            path=bundle, namespace=opts.namespace, workdir=os.path.join(tmp, "work")
        )
        return client.start(
            binary,
            f"unix://{tmp}/shim.sock",
            "",
            config=config,
            containerd_binary=publish,
            debug=opts.debug,
            env=_shim_env(),
        )
    return client.start_v2(
        binary,
        container_id=container_id,
        bundle=bundle,
        namespace=opts.namespace,
        containerd_address=os.path.join(tmp, "containerd.sock"),
        publish_binary=publish,
        debug=opts.debug,
        env=_shim_env(),
    )


def _run_in(
    tmp: str,
    bundle: str,
    container_id: str,
    binary: list[str],
    v1: bool,
    terminal: bool,
    opts: argparse.Namespace,
) -> int:
    paths = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
    for path in paths.values():
        os.mkfifo(path, 0o600)
    forward_stdin = _stdin_usable()
    fds: list[int] = []
    copies: list[_Copy] = []
    # Readers first: a shim opens the output fifos for writing during Create.
    out_fd = os.open(paths["stdout"], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    fds.append(out_fd)
    err_fd = -1
    if not terminal:
        err_fd = os.open(paths["stderr"], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        fds.append(err_fd)
    in_fd = -1
    if forward_stdin:
        # Read and write: never blocks, and stays open until we say EOF (CloseIO).
        in_fd = os.open(paths["stdin"], os.O_RDWR | os.O_CLOEXEC)
        fds.append(in_fd)
    io = client.IO(
        stdin=paths["stdin"] if forward_stdin else "",
        stdout=paths["stdout"],
        stderr="" if terminal else paths["stderr"],
        terminal=terminal,
    )
    saved_tty: list[int | list[bytes | int]] | None = None
    # Our signals go to the container: queued from now on, forwarded once it exists.
    # (From a thread of its own: a handler runs on the main thread, in the middle of
    # its call to the shim, and may not make another.)
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
        previous[sig] = signal.signal(sig, lambda signum, frame: signals.put(signum))
    created = started = False
    shim: client.Shim | None = None
    try:
        shim = _start_shim(tmp, bundle, container_id, binary, v1, opts)
        shim.create(container_id, bundle, io)
        created = True
        if terminal:
            # Before start: the process sees its terminal's size from the beginning.
            size = _terminal_size(0) or _terminal_size(1)
            if size:
                with contextlib.suppress(RpcError):
                    shim.resize_pty(container_id, *size)
        threading.Thread(
            target=_forward_signals, args=(signals, shim, container_id), daemon=True
        ).start()
        copies.append(_Copy(out_fd, 1, "stdout", fifo_reader=True))
        if err_fd >= 0:
            copies.append(_Copy(err_fd, 2, "stderr", fifo_reader=True))
        for copy in copies:
            copy.start()
        shim.start(container_id)
        started = True
        if terminal and os.isatty(0):
            saved_tty = termios.tcgetattr(0)
            tty_mod.setraw(0)

        if forward_stdin:
            stdin_copy = _Copy(0, in_fd, "stdin")
            stdin_copy.start()
            threading.Thread(
                target=_close_stdin_at_eof,
                args=(stdin_copy, shim, container_id, in_fd, fds),
                daemon=True,
            ).start()
            copies.append(stdin_copy)
        exited = shim.wait(container_id)
        # Go's shims report the exit before their copy has finished: take what is left.
        for copy in copies:
            if copy.name != "stdin":
                copy.eof.wait(DRAIN_TIMEOUT)
        shim.delete(container_id)
        created = False
        return exited.status
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if saved_tty is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved_tty)
        if shim is not None:
            _cleanup(shim, container_id, created, started, v1, binary, bundle, tmp, opts)
        for copy in copies:
            copy.close()
        with _FDS_LOCK:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            fds.clear()


def _forward_signals(signals: queue.SimpleQueue[int], shim: client.Shim, container_id: str) -> None:
    """Pass our signals on: SIGWINCH as a terminal resize, the others to the container."""
    while True:
        signum = signals.get()
        with contextlib.suppress(RpcError, OSError):
            if signum == signal.SIGWINCH:
                size = _terminal_size(0) or _terminal_size(1)
                if size:
                    shim.resize_pty(container_id, *size)
            else:
                shim.kill(container_id, signum)


def _close_stdin_at_eof(
    copy: _Copy, shim: client.Shim, container_id: str, in_fd: int, fds: list[int]
) -> None:
    """Our stdin ended: close the fifo and tell the shim (the process sees EOF)."""
    copy.eof.wait()
    with _FDS_LOCK:  # the main thread may be closing ``fds`` at the same moment
        if in_fd not in fds:
            return  # already closed by run(): its number may belong to someone else now
        fds.remove(in_fd)
        os.close(in_fd)
    with contextlib.suppress(RpcError, OSError):
        shim.close_io(container_id)


def _cleanup(
    shim: client.Shim,
    container_id: str,
    created: bool,
    started: bool,
    v1: bool,
    binary: list[str],
    bundle: str,
    tmp: str,
    opts: argparse.Namespace,
) -> None:
    """Leave nothing behind: the container, the shim, its socket and runc's state."""
    if created:
        with contextlib.suppress(RpcError, OSError):
            if started:
                shim.kill(container_id, signal.SIGKILL, all_processes=True)
                shim.wait(container_id, timeout=client.DEFAULT_TIMEOUT)
            shim.delete(container_id)
    try:
        shim.shutdown()
    except (RpcError, OSError, TimeoutError):
        with contextlib.suppress(RpcError, OSError, TimeoutError):
            shim.kill_shim()
        if not v1:
            with contextlib.suppress(client.ShimError, OSError):
                client.delete_v2(
                    binary,
                    container_id=container_id,
                    bundle=bundle,
                    namespace=opts.namespace,
                    containerd_address=os.path.join(tmp, "containerd.sock"),
                    env=_shim_env(),
                )
    finally:
        shim.close()


if __name__ == "__main__":
    sys.exit(main())
