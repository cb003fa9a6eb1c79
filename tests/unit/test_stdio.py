"""ProcessIO with real fifos, pipes, ptys and child processes (Linux)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import socket
import struct
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from containerd_shim.stdio import NoTerminalError, ProcessIO, StdioError

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only"),
]

PY = sys.executable


# -- helpers --------------------------------------------------------------------


class Children:
    """Spawns children like the shim's spawner does (posix_spawn + dup2), and reaps them."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def spawn(
        self,
        argv: list[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        pass_fds: dict[int, int] | None = None,
        env: dict[str, str] | None = None,
    ) -> int:
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            targets = {0: stdin, 1: stdout, 2: stderr, **(pass_fds or {})}
            actions = [
                (os.POSIX_SPAWN_DUP2, devnull if fd is None else fd, target)
                for target, fd in targets.items()
            ]
            pid = os.posix_spawn(
                argv[0],
                argv,
                dict(os.environ) if env is None else env,
                file_actions=actions,
                setsigdef=(signal.SIGPIPE,),
            )
        finally:
            os.close(devnull)
        self.pids.append(pid)
        return pid

    def run(self, io: ProcessIO, argv: list[str]) -> int:
        """What the shim does around ``runc create``: spawn with child_stdio(), started()."""
        stdin, stdout, stderr = io.child_stdio()
        pid = self.spawn(argv, stdin=stdin, stdout=stdout, stderr=stderr)
        io.started()
        return pid

    def wait(self, pid: int) -> int:
        """Exit status (or -signal) of a child of ours."""
        _, status = os.waitpid(pid, 0)
        self.pids.remove(pid)
        return os.waitstatus_to_exitcode(status)

    def cleanup(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    yield c
    c.cleanup()


def _open_fds() -> dict[str, str]:
    result = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listdir's own fd
            result[name] = os.readlink(f"/proc/self/fd/{name}")
    return result


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test must end with the fds it started with and no copier threads."""
    before = _open_fds()
    yield
    alive = [t.name for t in threading.enumerate() if t.name.startswith("io-")]
    assert not alive, f"copier threads still running: {alive}"
    leaked = {fd: target for fd, target in _open_fds().items() if fd not in before}
    assert not leaked, f"fds leaked: {leaked}"


class FifoReader:
    """The client side of an output fifo, like ctr: a blocking open (in the background,
    as containerd's fifo package does it), then read until EOF."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while chunk := os.read(fd, 1 << 16):
                self.chunks.append(chunk)
        finally:
            os.close(fd)

    def result(self, timeout: float = 30) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "no EOF on the fifo"
        return b"".join(self.chunks)


def fifo(tmp_path: Path, name: str) -> str:
    path = str(tmp_path / name)
    os.mkfifo(path)
    return path


def write_fifo(path: str, data: bytes) -> None:
    """A client writing to the stdin fifo (the shim holds a reader, so no blocking)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# -- no stdio -----------------------------------------------------------------------


def test_empty_paths_mean_dev_null(children: Children) -> None:
    with ProcessIO("c1", "ns") as io:
        assert io.child_stdio() == (None, None, None)
        assert io.console_socket is None
        pid = children.run(io, ["/bin/sh", "-c", "echo lost; echo lost >&2"])
        assert children.wait(pid) == 0
        assert io.wait(5)
        with pytest.raises(NoTerminalError):
            io.resize(80, 24)
        io.close_stdin()  # no stdin: nothing to do


def test_only_stderr(tmp_path: Path, children: Children) -> None:
    err = fifo(tmp_path, "err")
    reader = FifoReader(err)
    with ProcessIO("c1", "ns", stderr=err) as io:
        stdin, stdout, stderr = io.child_stdio()
        assert stdin is None and stdout is None and stderr is not None
        pid = children.run(io, ["/bin/sh", "-c", "echo out; echo err >&2"])
        assert children.wait(pid) == 0
        assert io.wait(5)
    assert reader.result() == b"err\n"


# -- output to fifos --------------------------------------------------------------


def test_large_output_to_fifos(tmp_path: Path, children: Children) -> None:
    size = 20 * 1024 * 1024
    blobs = []
    for name in ("blob1", "blob2"):
        data = os.urandom(size)
        (tmp_path / name).write_bytes(data)
        blobs.append(hashlib.sha256(data).hexdigest())
    out, err = fifo(tmp_path, "out"), fifo(tmp_path, "err")
    out_reader, err_reader = FifoReader(out), FifoReader(err)
    with ProcessIO("c1", "ns", stdout=out, stderr=err) as io:
        script = f"cat {tmp_path}/blob1 & cat {tmp_path}/blob2 >&2; wait"
        pid = children.run(io, ["/bin/sh", "-c", script])
        assert children.wait(pid) == 0
        assert io.wait(30)
        got_out, got_err = out_reader.result(), err_reader.result()
    assert len(got_out) == size and hashlib.sha256(got_out).hexdigest() == blobs[0]
    assert len(got_err) == size and hashlib.sha256(got_err).hexdigest() == blobs[1]


def test_output_written_just_before_exit(tmp_path: Path, children: Children) -> None:
    # The shim's order: the reaper sees the exit, then io.wait(), then the exit event.
    # After wait() returned True every byte must already be in the client's fifo.
    script = (
        "import os, sys\n"
        "os.write(1, b'x' * 300000)\n"
        "os.write(2, b'last words\\n')\n"
        "os.write(1, b'END')\n"
        "os._exit(3)\n"
    )
    for _ in range(10):
        out, err = fifo(tmp_path, "out"), fifo(tmp_path, "err")
        out_reader, err_reader = FifoReader(out), FifoReader(err)
        io = ProcessIO("c1", "ns", stdout=out, stderr=err)
        try:
            pid = children.run(io, [PY, "-c", script])
            assert children.wait(pid) == 3
            assert io.wait(10)
            # EOF reached the client: wait() only returns once the fifo is closed.
            assert out_reader.result(5) == b"x" * 300000 + b"END"
            assert err_reader.result(5) == b"last words\n"
        finally:
            io.close()
        os.unlink(out)
        os.unlink(err)


def test_client_opens_fifo_late(tmp_path: Path, children: Children) -> None:
    # Like containerd: the copier waits for the client's reader instead of writing
    # into a fifo nobody has open (where the data would be lost on close).
    out = fifo(tmp_path, "out")
    with ProcessIO("c1", "ns", stdout=out) as io:
        pid = children.run(io, ["/bin/sh", "-c", "echo early bird"])
        assert children.wait(pid) == 0
        assert not io.wait(0.2)  # nobody reads yet: output waits in the pipe
        reader = FifoReader(out)
        assert io.wait(10)
        assert reader.result() == b"early bird\n"


def test_close_stops_copier_waiting_for_a_reader(tmp_path: Path, children: Children) -> None:
    out, err = fifo(tmp_path, "out"), fifo(tmp_path, "err")
    io = ProcessIO("c1", "ns", stdout=out, stderr=err)
    pid = children.run(io, ["/bin/sh", "-c", "echo nobody listens; echo here >&2"])
    assert children.wait(pid) == 0
    assert not io.wait(0.1)
    io.close()  # must not hang in the copiers' blocking fifo opens
    io.close()  # idempotent


def test_client_reader_goes_away(tmp_path: Path, children: Children) -> None:
    # The shim keeps a reader of its own: a client that closes its end must neither
    # break copying (no EPIPE) nor lose what arrives before it comes back.
    out = fifo(tmp_path, "out")
    stdin = fifo(tmp_path, "in")
    with ProcessIO("c1", "ns", stdin=stdin, stdout=out) as io:
        pid = children.run(io, ["/bin/cat"])
        first = os.open(out, os.O_RDONLY | os.O_CLOEXEC)  # meets the copier's writer
        write_fifo(stdin, b"one\n")
        assert os.read(first, 100) == b"one\n"
        os.close(first)  # the client detaches (no EOF for anybody)
        write_fifo(stdin, b"two\n")  # copied into the fifo while nobody reads
        second = os.open(out, os.O_RDONLY | os.O_CLOEXEC)  # reattach: our writer is there
        io.close_stdin()
        assert children.wait(pid) == 0
        assert io.wait(10)
        with os.fdopen(second, "rb") as f:
            assert f.read() == b"two\n"


# -- stdin ----------------------------------------------------------------------


def test_stdin_round_trip_with_cat(tmp_path: Path, children: Children) -> None:
    stdin, out = fifo(tmp_path, "in"), fifo(tmp_path, "out")
    reader = FifoReader(out)
    payload = os.urandom(3 * 1024 * 1024)
    with ProcessIO("c1", "ns", stdin=stdin, stdout=out) as io:
        pid = children.run(io, ["/bin/cat"])
        # A client closing its writer is not EOF (containerd semantics: it may
        # reattach); only CloseIO is. Write in two sessions to prove it.
        write_fifo(stdin, payload[:1000])
        write_fifo(stdin, payload[1000:])
        io.close_stdin()
        assert children.wait(pid) == 0
        assert io.wait(10)
    assert reader.result() == payload


def test_close_stdin_before_client_closes(tmp_path: Path, children: Children) -> None:
    # ctr calls CloseIO first and closes its fifo writer right after: input still in
    # flight must reach the process, and EOF follows once the client is gone.
    stdin, out = fifo(tmp_path, "in"), fifo(tmp_path, "out")
    reader = FifoReader(out)
    with ProcessIO("c1", "ns", stdin=stdin, stdout=out) as io:
        pid = children.run(io, ["/bin/cat"])
        client = os.open(stdin, os.O_WRONLY | os.O_CLOEXEC)
        os.write(client, b"before\n")
        io.close_stdin()
        io.close_stdin()  # idempotent
        os.write(client, b"after\n")
        os.close(client)
        assert children.wait(pid) == 0
        assert io.wait(10)
    assert reader.result() == b"before\nafter\n"


def test_close_stdin_before_started(tmp_path: Path, children: Children) -> None:
    stdin, out = fifo(tmp_path, "in"), fifo(tmp_path, "out")
    reader = FifoReader(out)
    with ProcessIO("c1", "ns", stdin=stdin, stdout=out) as io:
        io.close_stdin()
        pid = children.run(io, ["/bin/cat"])
        assert children.wait(pid) == 0
        assert io.wait(10)
    assert reader.result() == b""


def test_process_ignoring_stdin_exits(tmp_path: Path, children: Children) -> None:
    # The process never reads stdin and exits: the stdin copier must stop quietly
    # (EPIPE), and close() must not hang.
    stdin, out = fifo(tmp_path, "in"), fifo(tmp_path, "out")
    reader = FifoReader(out)
    with ProcessIO("c1", "ns", stdin=stdin, stdout=out) as io:
        pid = children.run(io, ["/bin/sh", "-c", "exec 0<&-; echo done"])
        assert children.wait(pid) == 0
        # Like containerd, the copier then closes the fifo: the client may see EPIPE.
        with contextlib.suppress(BrokenPipeError):
            write_fifo(stdin, b"ignored\n" * 10000)
        assert io.wait(10)
    assert reader.result() == b"done\n"


# -- file:// --------------------------------------------------------------------------


def test_file_uri_gets_both_streams(tmp_path: Path, children: Children) -> None:
    log_path = tmp_path / "logs" / "sub" / "c1.log"
    lines = 20000
    script = (
        "import os\n"
        f"for i in range({lines}):\n"
        "    os.write(1, b'stdout line %d\\n' % i)\n"
        "    os.write(2, b'stderr line %d\\n' % i)\n"
    )
    uri = f"file://{log_path}"
    with ProcessIO("c1", "ns", stdout=uri, stderr=uri) as io:
        pid = children.run(io, [PY, "-c", script])
        assert children.wait(pid) == 0
        assert io.wait(10)
    got = log_path.read_bytes().splitlines()
    expected = [b"stdout line %d" % i for i in range(lines)]
    expected += [b"stderr line %d" % i for i in range(lines)]
    assert sorted(got) == sorted(expected)
    # Each stream keeps its own order.
    assert [x for x in got if x.startswith(b"stdout")] == expected[:lines]
    assert oct(log_path.stat().st_mode & 0o777) == oct(0o644)


def test_file_uri_appends(tmp_path: Path, children: Children) -> None:
    log_path = tmp_path / "c1.log"
    log_path.write_bytes(b"old\n")
    uri = f"file://{log_path}"
    with ProcessIO("c1", "ns", stdout=uri, stderr="") as io:
        assert io.child_stdio()[2] is None  # stderr not asked for: /dev/null
        pid = children.run(io, ["/bin/sh", "-c", "echo new; echo hidden >&2"])
        assert children.wait(pid) == 0
        assert io.wait(10)
    assert log_path.read_bytes() == b"old\nnew\n"


def test_bad_stdout_uri() -> None:
    with pytest.raises(StdioError, match="unknown STDIO scheme"):
        ProcessIO("c1", "ns", stdout="ftp://example/x")


def test_missing_fifo_fails_early(tmp_path: Path) -> None:
    with pytest.raises(StdioError):
        ProcessIO("c1", "ns", stdout=str(tmp_path / "missing"))
    with pytest.raises(StdioError):
        ProcessIO("c1", "ns", stdin=str(tmp_path / "missing"))


# -- binary:// -----------------------------------------------------------------------

LOGGER = """\
import os, sys, threading
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
with open(args["env"], "w") as f:
    # (Python itself adds LC_CTYPE to its environment: PEP 538 locale coercion.)
    f.write(repr(sorted(kv for kv in os.environ.items() if kv[0] != "LC_CTYPE")))
def copy(fd, path):
    with open(path, "wb") as f:
        while data := os.read(fd, 65536):
            f.write(data)
threads = [threading.Thread(target=copy, args=(3, args["out"])),
           threading.Thread(target=copy, args=(4, args["err"]))]
for t in threads:
    t.start()
os.close(5)  # ready
for t in threads:
    t.join()
"""


def _logger(tmp_path: Path, body: str = LOGGER) -> str:
    path = tmp_path / "logger.py"
    path.write_text(f"#!{PY}\n{body}")
    path.chmod(0o755)
    return str(path)


def test_binary_logger(tmp_path: Path, children: Children) -> None:
    logger = _logger(tmp_path)
    out, err, env = tmp_path / "out.log", tmp_path / "err.log", tmp_path / "env"
    uri = f"binary://{logger}?out={out}&err={err}&env={env}"
    with ProcessIO("c1", "ns1", stdout=uri, stderr=uri, spawn=children.spawn) as io:
        assert io.logger_pid is not None
        pid = children.run(io, ["/bin/sh", "-c", "echo to-out; echo to-err >&2"])
        assert children.wait(pid) == 0
        assert io.wait(5)  # the logger copies, not us
        # The logger sees EOF once the process is gone: we closed our pipe ends.
        assert children.wait(io.logger_pid) == 0
    assert out.read_bytes() == b"to-out\n"
    assert err.read_bytes() == b"to-err\n"
    assert eval(env.read_text()) == [("CONTAINER_ID", "c1"), ("CONTAINER_NAMESPACE", "ns1")]


def test_binary_logger_not_ready(tmp_path: Path, children: Children) -> None:
    logger = _logger(tmp_path, "import time\ntime.sleep(60)\n")
    with pytest.raises(StdioError, match="not ready"):
        ProcessIO(
            "c1",
            "ns",
            stdout=f"binary://{logger}",
            spawn=children.spawn,
            logger_ready_timeout=0.3,
        )
    (pid,) = children.pids
    assert children.wait(pid) == -signal.SIGKILL


def test_binary_logger_terminated_on_close(tmp_path: Path, children: Children) -> None:
    logger = _logger(tmp_path, "import os, time\nos.close(5)\ntime.sleep(60)\n")
    io = ProcessIO("c1", "ns", stdout=f"binary://{logger}", spawn=children.spawn)
    pid = children.run(io, ["/bin/true"])
    assert children.wait(pid) == 0
    io.close()
    assert io.logger_pid is not None
    assert children.wait(io.logger_pid) == -signal.SIGTERM


def test_binary_logger_needs_spawn(tmp_path: Path) -> None:
    with pytest.raises(StdioError, match="spawn"):
        ProcessIO("c1", "ns", stdout="binary:///bin/true")


# -- terminal ----------------------------------------------------------------------


class FakeRunc:
    """runc's side of --console-socket: make a pty, run the process on it, send the master."""

    def __init__(self, children: Children, io: ProcessIO, argv: list[str]) -> None:
        self.master, self.slave = os.openpty()
        assert io.child_stdio() == (None, None, None)
        assert io.console_socket is not None
        assert os.stat(io.console_socket).st_mode & 0o777 == 0o600
        self.pid = children.spawn(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(io.console_socket)
            socket.send_fds(sock, [os.ttyname(self.slave).encode()], [self.master])
        os.close(self.master)  # runc hands it over and forgets it

    def close_slave(self) -> None:
        os.close(self.slave)


def test_terminal_round_trip_and_resize(tmp_path: Path, children: Children) -> None:
    stdin, out = fifo(tmp_path, "in"), fifo(tmp_path, "out")
    reader = FifoReader(out)
    with ProcessIO(
        "c1", "ns", stdin=stdin, stdout=out, terminal=True, work_dir=str(tmp_path)
    ) as io:
        runc = FakeRunc(children, io, ["/bin/cat"])
        io.started()
        assert io.console_socket is None  # consumed and removed
        io.resize(132, 43)
        size = fcntl.ioctl(runc.slave, termios.TIOCGWINSZ, b"\0" * 8)
        assert struct.unpack("HHHH", size)[:2] == (43, 132)
        runc.close_slave()
        write_fifo(stdin, b"hello\n")
        write_fifo(stdin, b"partial")  # no newline: EOF must still reach cat
        io.close_stdin()
        assert children.wait(runc.pid) == 0
        assert io.wait(10)
    output = reader.result()
    # The tty echoes the input and cat prints it; ONLCR turns \n into \r\n.
    assert output.count(b"hello\r\n") == 2
    assert output.count(b"partial") == 2


def test_terminal_output_just_before_exit(tmp_path: Path, children: Children) -> None:
    out = fifo(tmp_path, "out")
    reader = FifoReader(out)
    script = "import os\nos.write(1, b'y' * 200000 + b'BYE')\nos._exit(0)\n"
    with ProcessIO("c1", "ns", stdout=out, terminal=True, work_dir=str(tmp_path)) as io:
        runc = FakeRunc(children, io, [PY, "-c", script])
        runc.close_slave()
        io.started()
        assert children.wait(runc.pid) == 0
        assert io.wait(10)  # EIO on the master is EOF
    assert reader.result() == b"y" * 200000 + b"BYE"


def test_terminal_long_work_dir_and_to_file(tmp_path: Path, children: Children) -> None:
    # Bundle paths with 64-character ids overflow sun_path: falls back to a temp dir.
    work_dir = tmp_path / ("x" * 64) / ("y" * 64)
    work_dir.mkdir(parents=True)
    log_path = tmp_path / "tty.log"
    with ProcessIO(
        "c1", "ns", stdout=f"file://{log_path}", terminal=True, work_dir=str(work_dir)
    ) as io:
        assert io.console_socket is not None and len(io.console_socket) < 108
        socket_dir = os.path.dirname(io.console_socket)
        runc = FakeRunc(children, io, ["/bin/echo", "on a tty"])
        runc.close_slave()
        io.started()
        assert not os.path.exists(socket_dir)
        assert children.wait(runc.pid) == 0
        assert io.wait(10)
    assert log_path.read_bytes() == b"on a tty\r\n"


def test_terminal_console_never_arrives(tmp_path: Path) -> None:
    io = ProcessIO("c1", "ns", terminal=True, work_dir=str(tmp_path))
    path = io.console_socket
    assert path is not None
    with pytest.raises(StdioError, match="no console"):
        io.started(timeout=0.2)
    io.close()
    assert not os.path.exists(path)


def test_terminal_rejects_non_tty(tmp_path: Path) -> None:
    io = ProcessIO("c1", "ns", terminal=True, work_dir=str(tmp_path))
    r, w = os.pipe()
    assert io.console_socket is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(io.console_socket)
        socket.send_fds(sock, [b"x"], [r])
    os.close(r)
    os.close(w)
    with pytest.raises(StdioError, match="not a terminal"):
        io.started(timeout=5)
    io.close()


# -- descriptors -------------------------------------------------------------------


def test_fds_are_cloexec_and_released(tmp_path: Path, children: Children) -> None:
    stdin, out, err = fifo(tmp_path, "in"), fifo(tmp_path, "out"), fifo(tmp_path, "err")
    before = set(_open_fds())
    io = ProcessIO("c1", "ns", stdin=stdin, stdout=out, stderr=err)
    ours = set(_open_fds()) - before
    assert ours
    for fd in ours:
        assert fcntl.fcntl(int(fd), fcntl.F_GETFD) & fcntl.FD_CLOEXEC, os.readlink(
            f"/proc/self/fd/{fd}"
        )
    # Renumbered so that a spawner dup2-ing onto 0..5 cannot clobber one with another.
    assert all(fd is not None and fd >= 6 for fd in io.child_stdio())
    io.close()  # never started: the child ends are ours to close


def test_spawn_receives_fds_3_to_5(tmp_path: Path, children: Children) -> None:
    # The logger's fds arrive where containerd puts them, whatever our numbers are.
    seen = tmp_path / "seen"
    body = (
        "import os, stat, sys\n"
        f"with open({str(seen)!r}, 'w') as f:\n"
        "    f.write(repr([stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (3, 4, 5)]))\n"
        "    f.write(repr(sys.argv[1:]))\n"
        "os.close(5)\n"
    )
    logger = _logger(tmp_path, body)
    uri = f"binary://{logger}?flag&key=a%20b&key=ignored"
    with ProcessIO("c1", "ns", stdout=uri, spawn=children.spawn) as io:
        assert io.logger_pid is not None
        assert children.wait(io.logger_pid) == 0
    assert seen.read_text() == repr([True, True, True]) + repr(["flag", "", "key", "a b"])
