"""Bundles, fifo readers, the full task lifecycle and leak checks for the shim client tests."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from containerd_shim import client
from containerd_shim.spec import oci_spec, process_spec

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
RUNC = shutil.which("runc") or "/usr/sbin/runc"
RUNC_ROOT = Path("/run/containerd/runc")
GO_V1_SHIM = shutil.which("containerd-shim") or "/usr/bin/containerd-shim"
GO_V2_SHIM = shutil.which("containerd-shim-runc-v2") or "/usr/bin/containerd-shim-runc-v2"
PY_V1_SHIM = [sys.executable, "-m", "containerd_shim.v1"]
PY_V2_SHIM = [sys.executable, "-m", "containerd_shim"]
TRUE = shutil.which("true") or "/bin/true"
KINDS = ["py-v1", "py-v2", "go-v1", "go-v2"]

# The init process: reads a line, answers on stdout and stderr, then waits for SIGTERM.
INIT = (
    "/bin/sh",
    "-c",
    'read line; echo "init got $line"; echo init-err >&2; '
    "trap 'kill $!; exit 7' TERM; sleep 1000 & wait",
)

_ids = itertools.count(1)


def shim_env() -> dict[str, str]:
    """Our environment, with this checkout importable by ``python -m`` shims."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


def new_id(prefix: str = "sc") -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


class FifoReader:
    """Reads a fifo in a thread, from before any writer opens it until the last one leaves."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._buf = bytearray()
        self._cond = threading.Condition()
        self.eof = False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_r in events:
                return
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            with self._cond:
                if data:
                    self._buf += data
                elif events.get(self.fd, 0) & select.POLLHUP:
                    self.eof = True  # a writer came and went
                    self._cond.notify_all()
                    return
                self._cond.notify_all()

    @property
    def data(self) -> bytes:
        with self._cond:
            return bytes(self._buf)

    def wait_for(self, needle: bytes, timeout: float = 20) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: needle in self._buf, timeout):
                raise AssertionError(f"{needle!r} not seen in {self.path}: {bytes(self._buf)!r}")

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)


@dataclass
class BundleDir:
    """A short temp dir: ``CID/config.json`` (the bundle), a work dir, stdio fifos on demand.

    The bundle directory is named after the container, as containerd lays bundles
    out: Go's v2 shim finds the bundle of its ``delete`` command as ``../ID``.
    """

    tmp: Path
    rootfs: Path
    cid: str
    readers: list[FifoReader] = field(default_factory=list)

    @property
    def bundle(self) -> str:
        return str(self.tmp / self.cid)

    @property
    def work(self) -> str:
        return str(self.tmp / "work")

    def write_spec(self, args: tuple[str, ...] | list[str], **kwargs: object) -> None:
        os.makedirs(self.bundle, mode=0o711, exist_ok=True)
        spec = oci_spec(str(self.rootfs), args, **kwargs)  # type: ignore[arg-type]
        Path(self.bundle, "config.json").write_text(json.dumps(spec))

    def fifo(self, name: str) -> str:
        path = str(self.tmp / name)
        os.mkfifo(path, 0o600)
        return path

    def reader(self, name: str) -> FifoReader:
        """A new fifo with a reader on it (a shim opens output fifos during create)."""
        reader = FifoReader(self.fifo(name))
        self.readers.append(reader)
        return reader

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


@contextlib.contextmanager
def bundle_dir(rootfs: Path, cid: str) -> Iterator[BundleDir]:
    tmp = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
    b = BundleDir(tmp, rootfs, cid)
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(tmp, ignore_errors=True)


def start_shim(kind: str, b: BundleDir, cid: str, namespace: str, **kwargs: object) -> client.Shim:
    """Start a shim of ``kind`` (py-v1, go-v1, py-v2, go-v2) for the bundle."""
    if kind.endswith("v1"):
        config = client.ShimConfig(path=b.bundle, namespace=namespace, workdir=b.work)
        return client.start(
            PY_V1_SHIM if kind == "py-v1" else GO_V1_SHIM,
            f"unix://{b.tmp}/shim.sock",
            "",
            config=config,
            containerd_binary=TRUE,
            env=shim_env(),
            **kwargs,  # type: ignore[arg-type]
        )
    return client.start_v2(
        PY_V2_SHIM if kind == "py-v2" else GO_V2_SHIM,
        container_id=cid,
        bundle=b.bundle,
        namespace=namespace,
        containerd_address=f"{b.tmp}/containerd.sock",
        publish_binary=TRUE,
        env=shim_env(),
        **kwargs,  # type: ignore[arg-type]
    )


def lifecycle(shim: client.Shim, b: BundleDir, cid: str) -> None:
    """create, start, state, stdin/stdout/stderr, pids, exec (two), kill, wait, delete."""
    b.write_spec(INIT)
    out, err = b.reader("out"), b.reader("err")
    stdin = b.fifo("in")
    stdin_w = os.open(stdin, os.O_RDWR | os.O_CLOEXEC)
    try:
        pid = shim.create(cid, b.bundle, client.IO(stdin=stdin, stdout=out.path, stderr=err.path))
        assert pid > 0
        state = shim.state(cid)
        assert (state.status, state.pid) == ("created", pid), state
        assert shim.start(cid) == pid
        assert shim.state(cid).status == "running"
        os.write(stdin_w, b"hello\n")
    finally:
        os.close(stdin_w)
    shim.close_io(cid)
    out.wait_for(b"init got hello\n")
    err.wait_for(b"init-err\n")
    assert (pid, "") in shim.pids(cid)

    e_out, e_err = b.reader("e1-out"), b.reader("e1-err")
    spec = process_spec(["/bin/sh", "-c", "echo exec-out; echo exec-err >&2; exit 3"])
    shim.exec(cid, "e1", spec, client.IO(stdout=e_out.path, stderr=e_err.path))
    assert shim.state(cid, "e1").status == "created"
    e1 = shim.start(cid, "e1")
    assert e1 > 0
    assert shim.wait(cid, "e1", timeout=20).status == 3
    e_out.wait_for(b"exec-out\n")
    e_err.wait_for(b"exec-err\n")
    state = shim.state(cid, "e1")
    assert (state.status, state.exit_status) == ("stopped", 3), state
    assert shim.delete(cid, "e1").status == 3

    shim.exec(cid, "e2", process_spec(["/bin/sleep", "1000"]))  # no stdio at all
    e2 = shim.start(cid, "e2")
    assert (e2, "e2") in shim.pids(cid)
    shim.kill(cid, signal.SIGKILL, "e2")
    assert shim.wait(cid, "e2", timeout=20).status == 128 + signal.SIGKILL
    shim.delete(cid, "e2")

    shim.kill(cid, signal.SIGTERM)
    exited = shim.wait(cid, timeout=20)
    assert exited.status == 7, exited
    assert exited.exited_at is not None and abs(exited.exited_at - time.time()) < 60
    state = shim.state(cid)
    assert (state.status, state.exit_status) == ("stopped", 7), state
    deleted = shim.delete(cid)
    assert (deleted.status, deleted.pid) == (7, pid), deleted


def pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def processes_in(path: Path) -> list[int]:
    """Live processes whose working directory is under ``path``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                cwd = os.readlink(f"/proc/{name}/cwd")
                if (cwd == str(path) or cwd.startswith(f"{path}/")) and not pid_gone(int(name)):
                    found.append(int(name))
    return found


def mounts_under(path: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == str(path) or point.startswith(f"{path}/"):
            found.append(point)
    return found


def socket_path(address: str) -> str | None:
    rest = address.removeprefix("unix://")
    return None if rest.startswith("@") else rest


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def assert_no_leaks(b: BundleDir, namespace: str, cid: str, shim_pid: int, address: str) -> None:
    assert pid_gone(shim_pid), f"shim {shim_pid} still running"
    assert processes_in(b.tmp) == [], "processes left in the bundle"
    assert mounts_under(b.tmp) == []
    assert not (RUNC_ROOT / namespace / cid).exists(), "runc state left"
    path = socket_path(address)
    if path is not None:
        assert not os.path.exists(path), f"socket {path} left"


def force_cleanup(b: BundleDir, namespace: str, cid: str) -> None:
    """After a failed test: kill what is left, runc delete, unmount."""
    for pid in processes_in(b.tmp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if (RUNC_ROOT / namespace / cid).exists():
        subprocess.run(
            [RUNC, "--root", str(RUNC_ROOT / namespace), "delete", "--force", cid],
            capture_output=True,
            timeout=15,
            check=False,
        )
    for point in sorted(mounts_under(b.tmp), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=15, check=False)
