"""A private containerd for end-to-end tests: config, lifecycle, ``ctr`` and cleanup helpers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from containerd_shim import launcher

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
RUNC = shutil.which("runc") or "/usr/sbin/runc"
REPO = Path(__file__).resolve().parents[2]

# Fixed by containerd 1.6 whatever the config says.
SHIM_SOCKET_DIR = Path("/run/containerd/s")
RUNC_ROOT = Path("/run/containerd/runc")
TASK_PLUGIN_DIR = "io.containerd.runtime.v2.task"

PYRUNC_SHIM = "containerd-shim-pyrunc-v2"
PYRUNC_V1_SHIM = "containerd-shim-pyrunc-v1"
GO_V1_SHIM = shutil.which("containerd-shim") or "/usr/bin/containerd-shim"
V1_RUNTIME = "io.containerd.runtime.v1.linux"

T = TypeVar("T")

# key=value and key="quoted value" fields of a logrus text line.
_LOG_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


class E2EError(AssertionError):
    """A failure of the harness or of a containerd operation (message carries the log tail)."""


def wait_for(
    predicate: Callable[[], T | bool | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            extra = ("\n" + describe()) if describe is not None else ""
            raise E2EError(f"timed out after {timeout:.1f}s waiting for {what}{extra}")
        time.sleep(interval)


def config_toml(tmp: Path) -> str:
    return f"""\
version = 2
root = "{tmp}/root"
state = "{tmp}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{tmp}/c.sock"

[ttrpc]
  address = "{tmp}/c.sock.ttrpc"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{tmp}/opt"
"""


def _chosen_python(variable: str, build_file: str) -> str | None:
    """An interpreter named by ``variable`` (empty: unset), else by ``scripts/setup`` in
    ``build/``."""
    chosen = os.environ.get(variable) or None
    if chosen is None:
        with contextlib.suppress(OSError):
            chosen = (REPO / "build" / build_file).read_text().strip()
    return chosen or None


def shim_python() -> str:
    """The interpreter our shims run on: ``PYRUNC_SHIM_PYTHON``, else the one
    ``scripts/setup`` chose (``build/shim-python``: a CPython 3.12+ when there is one,
    whose immortal objects let forked shims share the zygote's memory), else this one."""
    return _chosen_python("PYRUNC_SHIM_PYTHON", "shim-python") or sys.executable


def zygote_socket_path() -> str:
    """Where our shims' zygote listens. The name depends on the shims' interpreter, so
    that interpreter is asked."""
    ask = "from containerd_shim import zygote; print(zygote.socket_path())"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([shim_python(), "-c", ask], env=env, capture_output=True, check=True)
    return out.stdout.decode().strip()


def start_python() -> str | None:
    """The interpreter our v2 shim's ``start`` and ``delete`` run on, if not
    :func:`shim_python`: ``PYRUNC_START_PYTHON``, else the one ``scripts/setup`` chose
    (``build/start-python``: the distribution's statically linked python3, which starts
    sooner)."""
    return _chosen_python("PYRUNC_START_PYTHON", "start-python")


def zygote_spares(zygote_pid: int) -> list[int]:
    """The spare daemons our zygote ``zygote_pid`` keeps forked ahead of the next start
    (found by the command line ``containerd_shim.zygote.spare_title`` gives them)."""
    from containerd_shim import zygote

    title = zygote.spare_title(zygote_pid).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().rstrip(b"\0") == title:
                    found.append(int(entry.name))
    return found


def pyrunc_wrapper(name: str) -> str:
    """This checkout's shim binary ``name`` through the package's fast launcher (what an
    install uses), on :func:`shim_python` (``start`` and ``delete`` on :func:`start_python`).
    PYTHONPATH is for the processes they start (daemon, zygote)."""
    src = str(REPO / "src")
    return launcher.script(
        name,
        python=shim_python(),
        start_python=start_python(),
        path_entry=src,
        env={"PYTHONPATH": src},
    )


def v1_runtime_config(shim: str) -> str:
    """Config for containerd's v1 runtime (``ctr run --runtime io.containerd.runtime.v1.linux``)
    with ``shim`` as its shim binary."""
    return f"""
[plugins."{V1_RUNTIME}"]
  shim = "{shim}"
  runtime = "runc"
"""


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` ('R', 'S', 'Z', ...) or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    state = process_state(pid)
    return state is not None and state not in ("Z", "X")


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg in (flag, "-" + flag):
            return argv[i + 1]
        if arg.startswith((flag + "=", "-" + flag + "=")):
            return arg.partition("=")[2]
    return None


def _unescape_mount(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 3 < len(path) and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def mounts_under(prefix: Path | str) -> list[str]:
    """Mount points (in our mount namespace) at or below ``prefix``, deepest first."""
    base = str(prefix).rstrip("/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape_mount(line.split()[4])
        if point == base or point.startswith(base + "/"):
            found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def socket_listening(path: Path | str) -> bool:
    """True if something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


@dataclass
class Task:
    id: str
    pid: int
    status: str


@dataclass
class Containerd:
    """A containerd daemon of our own, in a short temp dir under /tmp."""

    tmp: Path
    namespace: str
    log_path: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    # (namespace, id) pairs whose shim sockets we may have to clean up.
    known_ids: set[tuple[str, str]] = field(default_factory=set, init=False)
    starts: int = field(default=0, init=False)
    # Added to containerd's environment (and so to every shim it starts) and to ctr's.
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_path = self.tmp / "containerd.log"

    # --- layout -------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return str(self.tmp / "c.sock")

    @property
    def ttrpc_address(self) -> str:
        return str(self.tmp / "c.sock.ttrpc")

    @property
    def root(self) -> Path:
        return self.tmp / "root"

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    @property
    def bin_dir(self) -> Path:
        return self.tmp / "bin"

    @property
    def config_path(self) -> Path:
        return self.tmp / "config.toml"

    def bundle(self, container_id: str, namespace: str | None = None) -> Path:
        return self.state / TASK_PLUGIN_DIR / (namespace or self.namespace) / container_id

    def shim_socket(self, container_id: str, namespace: str | None = None) -> Path:
        """Where containerd 1.6's shims put their socket (runtime/v2/shim.SocketAddress)."""
        key = os.path.join(self.address, namespace or self.namespace, container_id)
        return SHIM_SOCKET_DIR / hashlib.sha256(key.encode()).hexdigest()

    def track(self, container_id: str, namespace: str | None = None) -> str:
        self.known_ids.add((namespace or self.namespace, container_id))
        return container_id

    # --- lifecycle ----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        namespace: str,
        *,
        v1_shim: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Containerd:
        """A containerd in a new temp dir; ``v1_shim`` (a path, or "pyrunc" for ours) is the
        shim of its v1 runtime (default: containerd's own choice, Go's ``containerd-shim``);
        ``extra_env`` goes into containerd's environment, which its shims inherit."""
        tmp = Path(tempfile.mkdtemp(prefix="e2e-", dir="/tmp"))
        cd = cls(tmp=tmp, namespace=namespace, extra_env=dict(extra_env or {}))
        for d in (cd.root, cd.state, cd.bin_dir, tmp / "opt"):
            d.mkdir(mode=0o711, parents=True, exist_ok=True)
        for name in (PYRUNC_SHIM, PYRUNC_V1_SHIM):
            wrapper = cd.bin_dir / name
            wrapper.write_text(pyrunc_wrapper(name))
            wrapper.chmod(0o755)
        config = config_toml(tmp)
        if v1_shim is not None:
            shim = str(cd.bin_dir / PYRUNC_V1_SHIM) if v1_shim == "pyrunc" else v1_shim
            config += v1_runtime_config(shim)
        cd.config_path.write_text(config)
        return cd

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30) -> None:
        assert self.proc is None, "containerd already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== e2e: containerd start #{self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise E2EError(
                    f"containerd exited with {self.proc.returncode} during startup\n"
                    + self.log_tail()
                )
            try:
                res = subprocess.run(
                    [CTR, "--address", self.address, "version"],
                    capture_output=True,
                    timeout=5,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return False
            return res.returncode == 0

        wait_for(
            ready,
            timeout=timeout,
            interval=0.1,
            what="containerd to answer",
            describe=self.log_tail,
        )

    def stop(self, timeout: float = 15) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL containerd (no shutdown of its own: shims and tasks are left as they are)."""
        proc, self.proc = self.proc, None
        assert proc is not None and proc.poll() is None, "containerd is not running"
        proc.kill()
        proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- ctr ----------------------------------------------------------------------------
    def ctr_argv(self, *args: str, namespace: str | None = None) -> list[str]:
        return [CTR, "--address", self.address, "--namespace", namespace or self.namespace, *args]

    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        timeout: float = 30,
        input: str | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd. Flags must come before the container id."""
        argv = self.ctr_argv(*args, namespace=namespace)
        try:
            res = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=timeout,
                env=self.env(),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise E2EError(
                f"{' '.join(argv)} timed out after {timeout}s\n"
                f"stdout: {_clip(exc.stdout)}\nstderr: {_clip(exc.stderr)}\n{self.log_tail()}"
            ) from None
        if check and res.returncode != 0:
            raise E2EError(self.explain(res, "ctr failed"))
        return res

    # --- diagnostics --------------------------------------------------------------------
    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no containerd log)"
        tail = text.splitlines()[-lines:]
        return f"--- containerd log tail ({self.log_path}) ---\n" + "\n".join(tail)

    def log_since_start(self) -> str:
        """containerd's log since its latest start (the harness marks each start)."""
        text = self.log_path.read_text(errors="replace")
        return text.rpartition(f"===== e2e: containerd start #{self.starts} =====")[2]

    def forwarded_events(self, namespace: str | None = None) -> list[str]:
        """Topics of the events shims forwarded to containerd since its latest start, in the
        order containerd took them (its debug log line "event forwarded", one per event)."""
        ns = namespace or self.namespace
        topics = []
        for line in self.log_since_start().splitlines():
            fields = dict(_LOG_FIELD.findall(line))
            if fields.get("msg") == '"event forwarded"' and fields.get("ns") == ns:
                topics.append(fields["topic"])
        return topics

    def explain(self, res: subprocess.CompletedProcess[str], headline: str = "") -> str:
        argv = res.args if isinstance(res.args, list) else [str(res.args)]
        return (
            f"{headline}\n$ {' '.join(map(str, argv))}\nexit: {res.returncode}\n"
            f"stdout: {_clip(res.stdout)}\nstderr: {_clip(res.stderr)}\n{self.log_tail()}"
        )

    # --- task helpers -------------------------------------------------------------------
    def tasks(self, namespace: str | None = None) -> dict[str, Task]:
        res = self.ctr("task", "ls", namespace=namespace, check=True)
        tasks: dict[str, Task] = {}
        for line in res.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                tasks[parts[0]] = Task(parts[0], int(parts[1]), parts[2])
        return tasks

    def task_status(self, container_id: str, namespace: str | None = None) -> str | None:
        task = self.tasks(namespace).get(container_id)
        return task.status if task else None

    def wait_status(
        self,
        container_id: str,
        statuses: Iterable[str | None],
        timeout: float = 15,
        namespace: str | None = None,
    ) -> str | None:
        wanted = set(statuses)
        seen: list[str | None] = []

        def check() -> tuple[str | None] | None:
            status = self.task_status(container_id, namespace)
            seen.append(status)
            return (status,) if status in wanted else None

        return wait_for(
            check,
            timeout=timeout,
            interval=0.05,
            what=f"task {container_id} to be {sorted(map(str, wanted))}",
            describe=lambda: f"last status: {seen[-1:]}\n{self.log_tail()}",
        )[0]

    def shim_pids(self, container_id: str, namespace: str | None = None) -> list[int]:
        """Pids of serving shims for the container (cmdline holds -namespace NS -id ID)."""
        ns = namespace or self.namespace
        found = []
        for pid in _pids():
            argv = _cmdline(pid)
            if (
                _flag_value(argv, "-id") == container_id
                and _flag_value(argv, "-namespace") == ns
                and argv[-1] not in ("start", "delete")
                and process_alive(pid)
            ):
                found.append(pid)
        return found

    def force_remove(self, container_id: str, namespace: str | None = None) -> None:
        """Best effort: get rid of the task and container, whatever state they are in."""
        status = self.task_status(container_id, namespace)
        if status == "PAUSED":
            self.ctr("task", "resume", container_id, namespace=namespace)
        if status is not None:
            self.ctr(
                "task", "kill", "--all", "--signal", "SIGKILL", container_id, namespace=namespace
            )
            with contextlib.suppress(E2EError):
                self.wait_status(container_id, ("STOPPED", None), timeout=10, namespace=namespace)
            self.ctr("task", "delete", "--force", container_id, namespace=namespace)
        self.ctr("container", "delete", container_id, namespace=namespace)

    # --- teardown -----------------------------------------------------------------------
    def _our_processes(self) -> list[int]:
        """Shims and container processes left by this containerd."""
        me = os.getpid()
        tmp = str(self.tmp)
        found = []
        for pid in _pids():
            if pid == me:
                continue
            argv = _cmdline(pid)
            cwd = _cwd(pid)
            if _flag_value(argv, "-address") == self.address or cwd.startswith(tmp + "/"):
                found.append(pid)
        return found

    def cleanup(self) -> None:
        """Stop containerd, kill leftover shims and containers, unmount, remove temp files."""
        namespaces: set[str] = {ns for ns, _ in self.known_ids}
        if self.running:
            with contextlib.suppress(Exception):
                res = self.ctr("namespaces", "ls", "-q", timeout=10)
                namespaces.update(res.stdout.split())
            for ns in namespaces:
                with contextlib.suppress(Exception):
                    for cid in self.tasks(ns):
                        self.track(cid, ns)
                        self.force_remove(cid, ns)
        self.stop()
        leftovers = self._our_processes()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(E2EError):
            wait_for(
                lambda: not any(process_alive(p) for p in leftovers),
                timeout=10,
                what="leftover processes to die",
            )
        # Containers that survived their shims: runc state of our namespaces.
        for ns in namespaces | {self.namespace}:
            runc_root = RUNC_ROOT / ns
            if runc_root.is_dir():
                for cid in os.listdir(runc_root):
                    _quiet_run([RUNC, "--root", str(runc_root), "delete", "--force", cid])
                with contextlib.suppress(OSError):
                    runc_root.rmdir()
        for point in mounts_under(self.tmp):
            if _quiet_run(["umount", point]) != 0:
                _quiet_run(["umount", "-l", point])
        for ns, cid in self.known_ids:
            with contextlib.suppress(OSError):
                self.shim_socket(cid, ns).unlink()
        # runc removes each container's cgroup, but not the per-namespace parent (/NS/ID).
        for ns in namespaces | {self.namespace}:
            for parent in Path("/sys/fs/cgroup").glob(f"*/{ns}"):
                with contextlib.suppress(OSError):
                    parent.rmdir()
            with contextlib.suppress(OSError):
                (Path("/sys/fs/cgroup") / ns).rmdir()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _quiet_run(argv: list[str], timeout: float = 15) -> int | None:
    """Run a cleanup command; its exit status, or None if it timed out."""
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        return None


def _clip(text: str | bytes | None, limit: int = 2000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"
