"""The runtime v2 binary contract: ``start`` launches the daemon, ``delete`` cleans up after it.

containerd runs ``containerd-shim-pyrunc-v2 -namespace NS -address A
-publish-binary B -id ID start`` in the bundle directory and reads the
shim's address from its stdout (stdout and stderr together in 1.6, so
nothing else may be printed). ``delete`` runs after every shim disconnect
and answers with a protobuf DeleteResponse on stdout.
"""

from __future__ import annotations

import os
import sys
import time

from containerd_shim.flags import Flags
from containerd_shim.ids import ID_RULE, MAX_ID, is_valid_id

TYPE_CHECKING = False  # not typing's: ``start`` and ``delete`` import as little as they can
if TYPE_CHECKING:
    import _socket

# ``start`` imports nothing heavy (no protobuf, no ttrpc, not even json or contextlib): it
# runs once per container, in an interpreter without site-packages (containerd_shim.launcher).

__all__ = ["SOCKET_DIR", "delete", "delete_response", "quick_delete", "socket_address", "start"]

SOCKET_DIR = "/run/containerd/s"
SOCKET_PATH_LIMIT = 106
# How long the first ``start`` waits for the zygote it launched before spawning its daemon.
ZYGOTE_WAIT = 10.0
# Containers sharing one of these annotation values share one shim.
GROUP_LABELS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")


def socket_address(containerd_address: str, namespace: str, group: str) -> str:
    """``unix:///run/containerd/s/<sha256 of address/namespace/id>``, as containerd's shims do."""
    from containerd_shim.digest import sha256

    digest = sha256(os.path.join(containerd_address, namespace, group).encode()).hexdigest()
    return f"unix://{SOCKET_DIR}/{digest}"


def _path(address: str) -> str:
    return address[len("unix://") :]


def _unix_socket() -> _socket.socket:
    """A close-on-exec unix stream socket (``_socket``, not ``socket``: that imports enum and
    selectors, ~8 ms per ``start``; imported here, ``delete`` does without)."""
    import _socket

    return _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)


def _can_connect(path: str) -> bool:
    s = _unix_socket()
    try:
        s.settimeout(2)
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def _listen(path: str) -> _socket.socket:
    """A 0600 listener at ``path`` (the mode is set before bind: no window for others)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    sock = _unix_socket()
    try:
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _validate_id(value: str) -> None:
    if not is_valid_id(value):
        raise SystemExit(f"id {value!r}: must match {ID_RULE} (at most {MAX_ID})")


def write_atomic(path: str, data: str) -> None:
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}")
    # os.open, not open(): a text file costs ``start`` a locale lookup and an io stack.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _group(bundle: str, container_id: str) -> str:
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            text = f.read()
        # Parse only when a label can be there (Go's encoder writes keys plainly): json
        # costs ``start`` ~8 ms of imports.
        if not any(label.encode() in text for label in GROUP_LABELS):
            return container_id
        import json

        annotations = json.loads(text).get("annotations") or {}
    except (OSError, ValueError, AttributeError):
        return container_id
    for label in GROUP_LABELS:
        if annotations.get(label):
            return str(annotations[label])
    return container_id


def start(flags: Flags, binary_argv: list[str]) -> str:
    """Start (or reuse) the daemon for this container; return its address.

    The daemon is forked by the zygote (:mod:`containerd_shim.zygote`) when one
    runs, else spawned (and a zygote launched for the next ``start``).
    """
    _validate_id(flags.id)
    if not flags.namespace:
        raise SystemExit("shim namespace cannot be empty")
    bundle = os.getcwd()
    address = socket_address(flags.address, flags.namespace, _group(bundle, flags.id))
    path = _path(address)
    if len(path) > SOCKET_PATH_LIMIT:
        raise SystemExit(f"{path!r}: unix socket path too long (> {SOCKET_PATH_LIMIT})")
    try:
        listener = _listen(path)
    except OSError as exc:
        if exc.errno != 98:  # EADDRINUSE
            raise
        if _can_connect(path):
            # A live shim serves this group already: share it.
            write_atomic(os.path.join(bundle, "address"), address)
            return address
        os.unlink(path)
        listener = _listen(path)
    try:
        write_atomic(os.path.join(bundle, "address"), address)
        argv = [
            *binary_argv,
            "-namespace",
            flags.namespace,
            "-id",
            flags.id,
            "-address",
            flags.address,
        ]
        if flags.publish_binary:
            argv += ["-publish-binary", flags.publish_binary]
        if flags.debug:
            argv.append("-debug")
        pid = _fork_daemon(argv, listener.fileno())
        if pid is None:
            pid = _spawn_daemon(argv, listener.fileno())
    except BaseException:
        listener.close()
        _unlink_quietly(path)
        raise
    listener.close()
    try:
        shim_cgroup = _shim_cgroup_from_stdin()
        if shim_cgroup:
            from containerd_shim.cgroupfs import add_process_to_cgroup

            add_process_to_cgroup(shim_cgroup, pid)
        adjust_oom_score(pid, os.getppid())
    except BaseException:
        try:  # noqa: SIM105 (no contextlib in ``start``)
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        _unlink_quietly(path)
        raise
    return address


def _unlink_quietly(path: str) -> None:
    try:  # noqa: SIM105 (no contextlib in ``start``)
        os.unlink(path)
    except OSError:
        pass


def _fork_daemon(argv: list[str], listener_fd: int) -> int | None:
    """The daemon's pid, forked by the zygote; None if the zygote is off or does not come up.

    With no zygote running, this ``start`` launches one and waits for it (a
    daemon spawned instead would pay the same imports, privately): at most
    :data:`ZYGOTE_WAIT` seconds, less if the zygote fails.
    """
    from containerd_shim import zygote

    if not zygote.enabled():
        return None
    path = zygote.socket_path()
    pid = zygote.request(path, "serve", argv, [listener_fd])
    if pid is not None:
        return pid
    try:
        launched: int | None = zygote.launch(path)
    except OSError:
        return None
    deadline = time.monotonic() + ZYGOTE_WAIT
    while time.monotonic() < deadline:
        if launched is not None:
            done, status = os.waitpid(launched, os.WNOHANG)
            if done:
                launched = None
                if status != 0:
                    return None  # it failed; 0: another zygote for this path is starting
        if _can_connect(path):
            return zygote.request(path, "serve", argv, [listener_fd])
        time.sleep(0.02)
    return None


def _spawn_daemon(argv: list[str], listener_fd: int) -> int:
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        # Nothing inherited on 0-2: containerd reads our stdout until EOF.
        actions = [
            (os.POSIX_SPAWN_DUP2, devnull, 0),
            (os.POSIX_SPAWN_DUP2, devnull, 1),
            (os.POSIX_SPAWN_DUP2, devnull, 2),
            (os.POSIX_SPAWN_DUP2, listener_fd, 3),
        ]
        return os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=actions, setsid=True)
    finally:
        os.close(devnull)


def _shim_cgroup_from_stdin() -> str:
    """``shim_cgroup`` of the runtime options (an Any) containerd 1.6 passes on stdin.

    Decoded by hand (Any: type_url 1, value 2; runc Options: shim_cgroup 3) so that
    ``start`` needs no protobuf.
    """
    try:
        if os.isatty(0):
            return ""
        data = sys.stdin.buffer.read()
    except (OSError, ValueError):
        return ""
    if not data:
        return ""
    any_ = _proto_fields(data)
    if not any_.get(1, b"").endswith(b"containerd.runc.v1.Options"):
        return ""
    return _proto_fields(any_.get(2, b"")).get(3, b"").decode()


def _proto_fields(data: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a protobuf message (last one wins); others skipped."""

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if i >= len(data):
                raise ValueError("truncated varint")
            b = data[i]
            value |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                return value, i
            shift += 7

    fields: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = varint(i)
            if i + size > len(data):
                raise ValueError("truncated field")
            fields[number] = data[i : i + size]
            i += size
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return fields


def adjust_oom_score(pid: int, parent: int) -> None:
    """The shim's OOM score is containerd's plus one: under memory pressure it goes first."""
    with open(f"/proc/{parent}/oom_score_adj") as f:
        score = int(f.read().strip())
    score = min(score + 1, 1000)
    with open(f"/proc/{pid}/oom_score_adj", "w") as f:
        f.write(str(score))


# runc's state directory root unless the runtime options name another (runc.DEFAULT_ROOT).
RUNC_DEFAULT_ROOT = "/run/containerd/runc"
DELETED_EXIT_STATUS = 128 + 9  # what containerd's Go shims report for a cleaned-up task


def quick_delete(flags: Flags) -> bytes | None:
    """``delete`` for a container that left nothing to clean up; None if it did.

    containerd runs ``delete`` after every shim disconnect, so mostly after a
    clean Shutdown: runc has deleted the container and the rootfs is unmounted.
    Then nothing needs runc, protobuf or a zygote: no runc state, nothing
    mounted on the rootfs, and the socket is dealt with as :func:`delete` does.
    """
    _validate_id(flags.id)
    bundle = os.path.realpath(flags.bundle or os.getcwd())
    root = _runc_root(bundle)
    if root is None or os.path.lexists(os.path.join(root, flags.namespace, flags.id)):
        return None
    from containerd_shim.mountinfo import mounted

    if mounted(os.path.join(bundle, "rootfs")):
        return None
    _remove_dead_socket(bundle)
    return delete_response(_init_pid(bundle), DELETED_EXIT_STATUS, time.time())


def _runc_root(bundle: str) -> str | None:
    """runc's root from the options ``Create`` saved (containers.write_options); None if
    it cannot be told without a JSON parser (json costs ~9 ms of imports here)."""
    try:
        with open(os.path.join(bundle, "options.json")) as f:
            text = f.read()
    except FileNotFoundError:
        return RUNC_DEFAULT_ROOT
    except OSError:
        return None
    # json.dump's own layout: '"root": "VALUE"'; anything escaped or repeated: give up.
    key = '"root": "'
    if text.count(key) != 1:
        return None
    start = text.index(key) + len(key)
    end = text.find('"', start)
    if end < 0 or "\\" in text[start:end]:
        return None
    return text[start:end] or RUNC_DEFAULT_ROOT


def _init_pid(bundle: str) -> int:
    try:
        with open(os.path.join(bundle, "init.pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def _remove_dead_socket(bundle: str) -> None:
    """Remove the shim socket named in the bundle's address file if nothing serves it."""
    try:
        with open(os.path.join(bundle, "address")) as f:
            address = f.read().strip()
    except OSError:
        return
    if address.startswith("unix://") and not _can_connect(_path(address)):
        _unlink_quietly(_path(address))


def delete_response(pid: int, exit_status: int, exited_at: float) -> bytes:
    """A serialized ``containerd.task.v2.DeleteResponse`` (pid 1, exit_status 2,
    exited_at 3 as a Timestamp), encoded by hand: ``delete`` needs no protobuf."""
    seconds, nanos = divmod(int(exited_at * 1e9), 1_000_000_000)
    stamp = _varint_field(1, seconds) + _varint_field(2, nanos)
    return (
        _varint_field(1, pid)
        + _varint_field(2, exit_status)
        + _varint(3 << 3 | 2)
        + _varint(len(stamp))
        + stamp
    )


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""  # proto3 omits zeros


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def delete(flags: Flags) -> bytes:
    """Clean up after a shim that is gone: runc delete, unmount, remove the socket.

    Returns the serialized DeleteResponse.
    """
    import contextlib

    from containerd_shim import mount
    from containerd_shim.containers import make_runc, read_options, validate_id
    from containerd_shim.reaper import Reaper
    from containerd_shim.runc import RuncError

    validate_id(flags.id)
    bundle = os.path.realpath(flags.bundle or os.getcwd())
    reaper = Reaper()
    reaper.start()
    options = read_options(bundle)
    runc = make_runc(reaper, bundle, flags.namespace, options)
    try:
        runc.delete(flags.id, force=True)
    except RuncError as exc:
        if "does not exist" not in exc.message:
            print(f"runc delete: {exc.message}", file=sys.stderr)
    with contextlib.suppress(mount.MountError):
        mount.unmount_all(reaper, os.path.join(bundle, "rootfs"))
    _remove_dead_socket(bundle)
    return delete_response(_init_pid(bundle), DELETED_EXIT_STATUS, time.time())
