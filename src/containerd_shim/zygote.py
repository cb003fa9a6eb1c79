"""A pre-imported parent that forks each container's shim daemon (and runs ``delete``).

A fresh Python shim pays its interpreter start-up and imports (protobuf, the
generated API, ttrpc) in every daemon and every ``delete``, and holds all of
it as private memory. The zygote imports that code once, freezes it out of
the garbage collector's reach (``gc.freeze``) and forks: forked daemons
share the zygote's pages copy-on-write.

One zygote per host, user and code version: its socket is
``/run/containerd/s/pyrunc-zygote-<hash>`` (0600 in a 0700 directory, and
the peer's uid is checked), the hash covering the interpreter's file, the package
locations and the modification times of their sources, so a changed shim
never runs through an old zygote. The first ``start`` that finds none
launches it (detached, own session, working directory ``/``) and spawns its
daemon directly; so does any ``start`` whose zygote is gone or fails. The
zygote exits after :data:`IDLE_SECONDS` without requests, or when its
socket is removed or replaced.

Requests (``start`` and ``delete`` are the clients): a 4-byte length, then
NUL-separated fields ``op, cwd, len(argv), *argv, *"KEY=VALUE" of the
environment`` (none of which can hold a NUL), with descriptors attached
(SCM_RIGHTS): ``serve`` passes the listener, ``delete`` its stdout and
stderr. For ``serve`` the zygote forks a child that forks the daemon and
exits at once (so the daemon, like a spawned one, is re-parented and is no
child of the zygote); the daemon's pid comes back as 4 bytes. The daemon
starts its own session, takes the request's working directory and
environment, the listener as fd 3, /dev/null as 0-2, and its command line
(``/proc/PID/cmdline``) shows the daemon's argv. For ``delete`` the forked
child runs the delete action and sends back its exit status (4 bytes).

After 0.1 s without requests the zygote forks a *spare* daemon the same way,
which waits on a socket pair for the next ``serve`` request (the zygote hands
it the request and the listener and answers with its pid at once: no fork
while ``start`` waits) and exits when the zygote closes its end. Before
forking anything the zygote shapes its memory for its children
(:mod:`containerd_shim.prefork`).

The zygote never starts a thread (forking a threaded process is unsafe). The
client side of this module imports almost nothing (``start`` and ``delete``
use it, once per container, without site-packages): ``_socket`` rather than
``socket``, no json, no contextlib.
"""

from __future__ import annotations

import _socket
import os
import sys
import time

import containerd_shim
from containerd_shim.digest import sha256
from containerd_shim.launcher import package_root

TYPE_CHECKING = False  # not typing's: ``start`` imports this module
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import NoReturn

__all__ = [
    "IDLE_SECONDS", "enabled", "in_child", "launch", "request", "socket_path", "spare_title",
]  # fmt: skip

SOCKET_DIR = "/run/containerd/s"
IDLE_SECONDS = float(os.environ.get("PYRUNC_ZYGOTE_IDLE", "600"))
# Room for the daemon's command line in the zygote's own argv area.
TITLE_ROOM = 4096
_MAX_REQUEST = 1 << 20


_IN_CHILD = False
_ZYGOTE_PID = 0


def in_child() -> bool:
    """True in a process forked by the zygote (which must not ask the zygote again)."""
    return _IN_CHILD


def forked_by() -> int:
    """The pid of the zygote that forked this process (0: not forked by one)."""
    return _ZYGOTE_PID if _IN_CHILD else 0


def enabled() -> bool:
    """``PYRUNC_ZYGOTE=0`` turns the zygote off (every shim is spawned directly)."""
    return os.environ.get("PYRUNC_ZYGOTE", "1") not in ("0", "false", "no", "")


# Not part of what a daemon runs: their changes need no new zygote.
_UNUSED_BY_DAEMONS = frozenset(("__pycache__", "cli", "codegen"))


def _fingerprint() -> str:
    # The zygote's interpreter by its file, not its sys.version: ``start`` may run on
    # another interpreter (containerd_shim.python) and must find the same socket.
    python = os.path.realpath(containerd_shim.python)
    try:
        st = os.stat(python)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = ""
    h = sha256(f"{os.getuid()}\0{python}\0{stamp}".encode())
    # Both packages ship in one distribution: they sit side by side.
    root = package_root()
    for name in ("containerd_shim", "ttrpc"):
        top = os.path.join(root, name)
        h.update(f"\0{name}={top}".encode())
        dirs = [top]
        while dirs:
            try:
                entries = sorted(os.scandir(dirs.pop()), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.endswith(".py"):
                    try:  # noqa: SIM105 (no contextlib in ``start``)
                        h.update(b"%d" % entry.stat().st_mtime_ns)
                    except OSError:
                        pass
                elif entry.name not in _UNUSED_BY_DAEMONS and entry.is_dir():
                    dirs.append(entry.path)
    return h.hexdigest()[:16]


def socket_path() -> str:
    return os.path.join(SOCKET_DIR, f"pyrunc-zygote-{_fingerprint()}")


# --- client side ------------------------------------------------------------------------


def encode_request(op: str, argv: list[str], env: dict[str, str], cwd: str) -> bytes:
    fields = [op, cwd, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
    return b"\0".join(os.fsencode(f) for f in fields)


def decode_request(payload: bytes) -> tuple[str, list[str], dict[str, str], str]:
    """``(op, argv, env, cwd)``; ValueError if malformed."""
    fields = [os.fsdecode(f) for f in payload.split(b"\0")]
    if len(fields) < 3 or not fields[2].isdigit() or len(fields) < 3 + int(fields[2]):
        raise ValueError("malformed request")
    op, cwd, argc = fields[0], fields[1], int(fields[2])
    argv = fields[3 : 3 + argc]
    env = {}
    for item in fields[3 + argc :]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError("malformed environment entry")
        env[key] = value
    return op, argv, env, cwd


# Integers on the wire by hand: ``struct`` would cost every ``start`` an import.
def _int32(value: int) -> bytes:
    """A status or pid as the zygote answers it (4 bytes, big-endian, signed)."""
    return value.to_bytes(4, "big", signed=True)


def _pack_fds(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)


def _unpack_fds(data: bytes) -> list[int]:
    return [
        int.from_bytes(data[i : i + 4], sys.byteorder, signed=True) for i in range(0, len(data), 4)
    ]


def _ucred_uid(ucred: bytes) -> int:
    """The uid in a ``struct ucred`` (pid, uid, gid: native ints)."""
    return int.from_bytes(ucred[4:8], sys.byteorder, signed=True)


def _send(sock: _socket.socket, payload: bytes, fds: list[int]) -> None:
    data = len(payload).to_bytes(4, "big") + payload
    ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _pack_fds(fds))]
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_exact(sock: _socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("zygote closed the connection")
        buf += chunk
    return buf


def request(
    path: str, op: str, argv: list[str], fds: list[int], *, timeout: float | None = 10.0
) -> int | None:
    """Ask the zygote at ``path`` to run ``op``; the daemon pid (``serve``) or exit status
    (``delete``), or None if there is no working zygote (the caller falls back)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            ucred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
            uid = _ucred_uid(ucred)
            if uid != os.getuid():
                return None
            _send(sock, encode_request(op, argv, dict(os.environ), os.getcwd()), fds)
            value = int.from_bytes(_recv_exact(sock, 4), "big", signed=True)
        except (OSError, ConnectionError, ValueError):
            return None
        return value if value >= 0 else None  # -1: refused (exit statuses are >= 0)
    finally:
        sock.close()


def launch(path: str) -> int:
    """Start a zygote for ``path`` in the background (detached, own session); its pid."""
    argv = [containerd_shim.python, "-m", "containerd_shim.zygote", path, "-" * TITLE_ROOM]
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
        return os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=actions, setsid=True)
    finally:
        os.close(devnull)


# --- the zygote ---------------------------------------------------------------------------


def _preload() -> None:
    """Import everything a daemon and ``delete`` use, so forked children share it."""
    import ctypes  # noqa: F401  (set_subreaper)
    import logging  # noqa: F401

    import containerd_shim.cgroups
    import containerd_shim.events
    import containerd_shim.manager
    import containerd_shim.mount
    import containerd_shim.serve
    import containerd_shim.service
    import containerd_shim.stdio  # noqa: F401
    import ttrpc.blocking  # noqa: F401


def _compile_packages() -> None:
    """Write the bytecode caches of this package and ttrpc where they are missing or stale,
    in a forked child, before the zygote imports them.

    The zygote would otherwise compile whatever has no cache for this interpreter
    (shims may run on another Python than the one the package was installed with), and
    keep the compiler's garbage; ``start`` and ``delete`` run as fresh interpreters per
    container and would compile their modules each time. (What ``compileall`` at install
    time does; a read-only install just goes without.)
    """
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        import compileall

        root = package_root()
        for name in ("containerd_shim", "ttrpc"):
            compileall.compile_dir(os.path.join(root, name), quiet=2)
    finally:
        os._exit(0)


def _argv_area() -> tuple[int, int]:
    with open("/proc/self/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # Fields 48 and 49 (1-based) are arg_start and arg_end; fields[0] is field 3.
    return int(fields[45]), int(fields[46])


def set_cmdline(argv: list[str], area: tuple[int, int]) -> bool:
    """Make ``/proc/self/cmdline`` show ``argv`` by rewriting our own argv area in place."""
    import ctypes

    start, end = area
    data = b"".join(a.encode() + b"\0" for a in argv)
    if len(data) > end - start:
        return False
    ctypes.memmove(start, data + b"\0" * (end - start - len(data)), end - start)
    return True


Request = tuple[str, list[str], dict[str, str], str]  # op, argv, env, cwd


def _recv_request(conn: _socket.socket) -> tuple[Request, list[int]]:
    fds: list[int] = []
    msg, ancdata, _flags, _addr = conn.recvmsg(65536, _socket.CMSG_SPACE(16 * 4))
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += _unpack_fds(data[:usable])
    try:
        if len(msg) < 4:
            msg += _recv_exact(conn, 4 - len(msg))
        size = int.from_bytes(msg[:4], "big")
        if size > _MAX_REQUEST:
            raise ValueError("request too large")
        body = msg[4:]
        if len(body) < size:
            body += _recv_exact(conn, size - len(body))
        request = decode_request(body)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


def _become(request: Request, keep: dict[int, int]) -> None:
    """In a forked child: take the request's environment, directory and descriptors."""
    global _IN_CHILD
    _IN_CHILD = True
    _op, argv, env, cwd = request
    # Only what differs: the zygote's environment is most often the very one asked for,
    # and rewriting all of it would copy the pages it lies on into each child.
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
    os.chdir(cwd)
    devnull = os.open(os.devnull, os.O_RDWR)
    targets = {0: devnull, 1: devnull, 2: devnull, **keep}
    # Move sources out of the way of the targets first (a source may sit on a target number).
    moved = {target: os.dup(source) for target, source in targets.items()}
    for target, source in moved.items():
        os.dup2(source, target)
    os.closerange(max(targets) + 1, 1 << 16)
    sys.argv = ["containerd-shim-pyrunc-v2", *_action_args(argv)]


def _run_main(args: list[str]) -> int:
    from containerd_shim.__main__ import main

    try:
        return main(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # stdout may be a closed pipe
            pass


def _action_args(argv: list[str]) -> list[str]:
    """The shim's own arguments in a daemon argv (after ``-m containerd_shim``)."""
    for i, a in enumerate(argv):
        if a == "containerd_shim" and i > 0 and argv[i - 1] == "-m":
            return argv[i + 1 :]
    return argv[1:]


def _record_if_asked(env: Mapping[str, str]) -> None:
    """``PYRUNC_RECORD_CODE``: record the code this daemon runs (scripts/hotcode)."""
    if env.get("PYRUNC_RECORD_CODE"):
        from containerd_shim.prefork import record_code

        record_code(env["PYRUNC_RECORD_CODE"])


def _serve(request: Request, fds: list[int], area: tuple[int, int]) -> int:
    """In the daemon (a zygote's grandchild, leading its own session): become the shim
    ``request`` asks for and serve; its exit status."""
    _record_if_asked(request[2])
    argv = request[1]
    set_cmdline(argv, area)
    _become(request, {3: fds[0]})
    return _run_main(_action_args(argv))


def _fork_daemon(report: _socket.socket, daemon: Callable[[], int]) -> NoReturn:
    """In the forked intermediate: fork the daemon (re-parented once this exits, leading
    its own session, running ``daemon``), report its pid on ``report``, exit."""
    code = 1
    try:
        pid = os.fork()
        if pid:
            report.sendall(_int32(pid))
            code = 0
        else:
            os.setsid()
            code = daemon()
    finally:
        os._exit(code)


def _serve_child(
    conn: _socket.socket, request: Request, fds: list[int], area: tuple[int, int]
) -> NoReturn:
    def daemon() -> int:
        os.close(conn.detach())
        return _serve(request, fds, area)

    _fork_daemon(conn, daemon)


# A daemon forked ahead of its request: ``start`` then waits for no fork. (pid, socket)
_spare: tuple[int, _socket.socket] | None = None
SPARE_AFTER = 0.1  # seconds without a request


def spare_title(zygote_pid: int) -> str:
    """The command line of a spare daemon of the zygote ``zygote_pid`` (see ``ps``)."""
    return f"containerd-shim-pyrunc-v2 spare (zygote {zygote_pid})"


def _make_spare(area: tuple[int, int]) -> bool:
    """Fork the next daemon now, the way ``serve`` would (twice: re-parented, in its own
    session), to wait on a socket pair for the request it will serve; whether it did."""
    global _spare
    import threading

    if _spare is not None or threading.active_count() != 1:
        return False
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        ours.close()
        _fork_daemon(theirs, lambda: _spare_main(theirs, area))
    theirs.close()
    os.waitpid(pid, 0)  # the intermediate exits at once
    try:
        ours.settimeout(5)
        daemon = int.from_bytes(_recv_exact(ours, 4), "big", signed=True)
    except (OSError, ConnectionError, ValueError):
        ours.close()
        return False
    _spare = (daemon, ours)
    return True


def _spare_main(sock: _socket.socket, area: tuple[int, int]) -> int:
    """The spare: wait for a request; the zygote closing the socket ends it."""
    _record_if_asked(os.environ)
    # None of the zygote's descriptors (its listener, its lock): the zygote alone owns them.
    os.closerange(3, sock.fileno())
    os.closerange(sock.fileno() + 1, 1 << 16)
    set_cmdline([spare_title(_ZYGOTE_PID)], area)
    try:
        request, fds = _recv_request(sock)
    except (OSError, ConnectionError, ValueError):
        return 0
    sock.close()
    return _serve(request, fds, area)


def _hand_to_spare(request: Request, fds: list[int]) -> int | None:
    """Give a ``serve`` request to the spare; its pid, or None if it is gone."""
    global _spare
    if _spare is None:
        return None
    pid, sock = _spare
    _spare = None
    try:
        # No answer awaited: a spare that died has closed its end, and sending fails.
        sock.settimeout(5)
        _send(sock, encode_request(request[0], request[1], request[2], request[3]), fds)
    except OSError:
        return None
    finally:
        sock.close()
    return pid


def _delete_child(conn: _socket.socket, request: Request, fds: list[int]) -> None:
    code = 1
    try:
        conn_fd = os.dup(conn.fileno())
        _become(request, {1: fds[0], 2: fds[1], 3: conn_fd})
        code = _run_main(_action_args(request[1]))
        os.write(3, _int32(code))
    finally:
        os._exit(code)


def _handle(conn: _socket.socket, area: tuple[int, int]) -> None:
    ucred = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    if _ucred_uid(ucred) != os.getuid():
        return
    conn.settimeout(5)
    request, fds = _recv_request(conn)
    try:
        op, argv = request[0], request[1]
        if op not in ("serve", "delete"):
            return
        if op == "serve" and (len(fds) != 1 or not _fits(argv, area)):
            conn.sendall(_int32(-1))
            return
        if op == "delete" and len(fds) != 2:
            return
        if op == "serve":
            pid = _hand_to_spare(request, fds)
            if pid is not None:
                conn.sendall(_int32(pid))
                return
        import threading

        if threading.active_count() != 1:  # never fork a threaded process
            conn.sendall(_int32(-1))
            return
        pid = os.fork()
        if pid == 0:
            if op == "serve":
                _serve_child(conn, request, fds, area)
            _delete_child(conn, request, fds)
        if op == "serve":
            os.waitpid(pid, 0)  # the intermediate exits at once
    finally:
        for fd in fds:
            os.close(fd)


def _fits(argv: list[str], area: tuple[int, int]) -> bool:
    return sum(len(os.fsencode(a)) + 1 for a in argv) <= area[1] - area[0]


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _shape_memory() -> None:
    """See :mod:`containerd_shim.prefork`; ``PYRUNC_PREFORK`` picks its steps (``none``, or
    some of ``seal,pack,types,immortal``) for measuring what each buys."""
    from containerd_shim import prefork

    chosen = os.environ.get("PYRUNC_PREFORK")
    steps = prefork.STEPS if chosen is None else tuple(chosen.split(","))
    prefork.shape(tuple(s for s in steps if s in prefork.STEPS))


def run(path: str) -> int:
    """The zygote's main loop (``python -m containerd_shim.zygote PATH``)."""
    import contextlib
    import fcntl
    import gc
    import selectors
    import socket

    os.chdir("/")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another zygote runs (or is starting) for this path
    _compile_packages()
    _preload()
    from containerd_shim.manager import adjust_oom_score

    with contextlib.suppress(OSError, ValueError):
        adjust_oom_score(os.getpid(), os.getpid())  # like a shim: one above who started it
    area = _argv_area()
    global _ZYGOTE_PID
    _ZYGOTE_PID = os.getpid()  # what its children report as the zygote that forked them
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    os.fchmod(listener.fileno(), 0o600)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(128)
    inode = os.stat(path).st_ino
    with open(path + ".pid.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".pid.tmp", path + ".pid")
    gc.collect()
    _shape_memory()
    gc.freeze()  # forked children never touch the pre-imported objects' GC headers
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    last = time.monotonic()
    spare_possible = True
    try:
        while True:
            # The spare is made once nothing happened for a moment: right after a start
            # the CPUs are for that start, its daemon and containerd.
            want_spare = _spare is None and spare_possible
            ready = selector.select(timeout=SPARE_AFTER if want_spare else 5)
            _reap()
            if not ready and want_spare:
                spare_possible = _make_spare(area)
                continue
            if not ready:
                try:
                    if os.stat(path).st_ino != inode:
                        return 0
                except FileNotFoundError:
                    return 0
                if time.monotonic() - last > IDLE_SECONDS:
                    return 0
                continue
            last = time.monotonic()
            spare_possible = True
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(Exception):
                _handle(conn, area)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)
                os.unlink(path + ".pid")


if __name__ == "__main__":
    # Run as the package's module, not as __main__: children check its in_child() flag.
    from containerd_shim.zygote import run as _run

    sys.exit(_run(sys.argv[1]))
