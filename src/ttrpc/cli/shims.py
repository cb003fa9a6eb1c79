"""``ttrpc shims``: the shims of a running containerd, and the state of their tasks.

containerd keeps one bundle directory per task under its state directory
(``state`` in its config.toml, ``/run/containerd`` by default):

- runtime v2: ``<state>/io.containerd.runtime.v2.task/<namespace>/<id>/``, whose
  ``address`` file holds the shim's ttrpc address (``unix:///run/containerd/s/<hash>``).
  The shim serves ``containerd.task.v2.Task``: ``Connect`` gives its pid,
  ``State`` the task's. containerd 1.6+ writes the shim binary's path to
  ``shim-binary-path``.
- runtime v1 (``io.containerd.runtime.v1.linux``, containerd <= 1.x):
  ``<state>/io.containerd.runtime.v1.linux/<namespace>/<id>/``, whose ``address``
  file holds ``unix:///run/containerd/s/<hash>``, or an abstract socket name
  without a scheme; without the file the shim listens on the abstract
  ``/containerd-shim/<namespace>/<id>/shim.sock`` (before containerd 1.2.x).
  ``shim.pid`` holds the shim's pid. The shim serves
  ``containerd.runtime.linux.shim.v1.Shim``: ``ShimInfo`` and ``State``.

Names starting with ``.`` are bundles being deleted, and are skipped. Calls
carry containerd's namespace metadata, as containerd's own do.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TextIO

from ttrpc.blocking import Client
from ttrpc.cli.call import connect
from ttrpc.cli.errors import EXIT_DATAERR, EXIT_NOINPUT, CliError, status_name
from ttrpc.cli.options import NAMESPACE_KEY
from ttrpc.context import Context
from ttrpc.status import Code, RpcError

__all__ = ["DEFAULT_CONFIG", "DEFAULT_STATE", "Shim", "discover", "probe", "run_shims", "state_dir"]

DEFAULT_STATE = "/run/containerd"
DEFAULT_CONFIG = "/etc/containerd/config.toml"
V2_DIR = "io.containerd.runtime.v2.task"
V1_DIR = "io.containerd.runtime.v1.linux"
_WORKERS = 16


@dataclass
class Shim:
    """One task's shim: where it is and, once probed, what it says."""

    namespace: str
    id: str
    runtime: str  # "v2" or "v1"
    bundle: str
    address: str
    shim: str = ""  # the shim binary's name, when known
    shim_pid: int | None = None
    pid: int | None = None  # the task's init process
    status: str | None = None  # the task's status (RUNNING, STOPPED, ...)
    error: str | None = None  # why it could not be asked


def state_dir(state: str | None, config: str | None) -> str:
    """containerd's state directory: ``state``, or read from ``config`` (config.toml), or
    from ``/etc/containerd/config.toml`` if it exists and says, or ``/run/containerd``."""
    if state:
        return state
    if config:
        return _state_from_config(config) or DEFAULT_STATE
    if os.path.exists(DEFAULT_CONFIG):
        try:
            return _state_from_config(DEFAULT_CONFIG) or DEFAULT_STATE
        except CliError:
            return DEFAULT_STATE  # not ours to complain about unasked
    return DEFAULT_STATE


def _state_from_config(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", EXIT_NOINPUT) from None
    if sys.version_info >= (3, 11):
        import tomllib

        try:
            config = tomllib.loads(raw.decode("utf-8", "replace"))
        except tomllib.TOMLDecodeError as exc:
            raise CliError(f"{path} is not valid TOML: {exc}", EXIT_DATAERR) from None
        value = config.get("state")
        return value if isinstance(value, str) and value else None
    return _state_from_toml_text(raw.decode("utf-8", "replace"))


_STATE_LINE = re.compile(r"""^\s*state\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)')\s*(?:#.*)?$""")


def _state_from_toml_text(text: str) -> str | None:
    """Python 3.10 has no tomllib: the top-level ``state = "..."`` line, before any table."""
    for line in text.splitlines():
        if line.lstrip().startswith("["):
            return None
        match = _STATE_LINE.match(line)
        if match:
            if match.group(2) is not None:
                return match.group(2) or None
            value: str = json.loads(f'"{match.group(1)}"')  # TOML basic strings escape like JSON
            return value or None
    return None


def discover(state: str, namespace: str | None = None) -> list[Shim]:
    """The task bundles under ``state`` (both runtimes), sorted; no socket is touched.

    Raises :class:`CliError` if neither runtime directory exists.
    """
    roots = [(V2_DIR, "v2"), (V1_DIR, "v1")]
    if not any(os.path.isdir(os.path.join(state, d)) for d, _ in roots):
        if not os.path.isdir(state):
            raise CliError(
                f"no containerd state directory {state} (give --state DIR or "
                "--containerd-config FILE)",
                EXIT_NOINPUT,
            )
        return []
    found: list[Shim] = []
    for subdir, runtime in roots:
        root = os.path.join(state, subdir)
        for ns in _entries(root):
            if namespace is not None and ns != namespace:
                continue
            for cid in _entries(os.path.join(root, ns)):
                bundle = os.path.join(root, ns, cid)
                address = _address(bundle, runtime, ns, cid)
                found.append(Shim(ns, cid, runtime, bundle, address, _binary(bundle, runtime)))
    found.sort(key=lambda s: (s.namespace, s.id, s.runtime))
    return found


def _entries(path: str) -> list[str]:
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(
        n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(path, n))
    )


def _address(bundle: str, runtime: str, namespace: str, cid: str) -> str:
    try:
        with open(os.path.join(bundle, "address"), encoding="utf-8") as f:
            address = f.read().strip()
    except OSError:
        if runtime == "v1":
            return f"unix://@/containerd-shim/{namespace}/{cid}/shim.sock"
        return ""
    if runtime == "v1" and address and not address.startswith("unix://"):
        return "unix://@" + address  # containerd's v1 client: no scheme means abstract
    return address


def _binary(bundle: str, runtime: str) -> str:
    """The shim binary: containerd 1.6+ records it in the v2 bundle; v1 always ran one."""
    if runtime == "v1":
        return "containerd-shim"
    try:
        with open(os.path.join(bundle, "shim-binary-path"), encoding="utf-8") as f:
            return os.path.basename(f.read().strip())
    except OSError:
        return ""


def _read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def probe(shim: Shim, timeout: float) -> Shim:
    """Ask the shim for its pid and its task's state (fills in ``shim``; errors go to
    ``shim.error``, never raised)."""
    if not shim.address:
        shim.error = "no address file in the bundle (the shim is not started)"
        shim.shim_pid = _read_pid(os.path.join(shim.bundle, "shim.pid"))
        return shim
    ctx = Context(timeout=timeout, metadata={NAMESPACE_KEY: shim.namespace})
    try:
        with connect(shim.address, timeout) as client:
            if shim.runtime == "v2":
                _probe_v2(shim, client, ctx)
            else:
                _probe_v1(shim, client, ctx)
    except RpcError as exc:
        shim.error = f"{status_name(exc.code)}: {exc.message}"
    except CliError as exc:
        shim.error = exc.message
    if shim.shim_pid is None:
        shim.shim_pid = _read_pid(os.path.join(shim.bundle, "shim.pid"))
    return shim


def _probe_v2(shim: Shim, client: Client, ctx: Context) -> None:
    from containerd_shim.api.runtime.v2.task import shim_pb2 as task
    from containerd_shim.api.types.task import task_pb2 as types

    service = "containerd.task.v2.Task"
    try:
        connected = client.call(
            service, "Connect", task.ConnectRequest(id=shim.id), task.ConnectResponse, ctx
        )
        shim.shim_pid = connected.shim_pid or None
    except RpcError as exc:
        if exc.code != Code.UNIMPLEMENTED:  # keep going: State says what matters
            raise
    state = client.call(service, "State", task.StateRequest(id=shim.id), task.StateResponse, ctx)
    shim.pid = state.pid
    shim.status = types.Status.Name(state.status)


def _probe_v1(shim: Shim, client: Client, ctx: Context) -> None:
    from google.protobuf.empty_pb2 import Empty

    from containerd_shim.api.runtime.v1.shim.v1 import shim_pb2 as v1
    from containerd_shim.api.types.task import task_pb2 as types

    service = "containerd.runtime.linux.shim.v1.Shim"
    info = client.call(service, "ShimInfo", Empty(), v1.ShimInfoResponse, ctx)
    shim.shim_pid = info.shim_pid or None
    state = client.call(service, "State", v1.StateRequest(id=shim.id), v1.StateResponse, ctx)
    shim.pid = state.pid
    shim.status = types.Status.Name(state.status)


def run_shims(
    state: str,
    *,
    namespace: str | None,
    timeout: float,
    output: str,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """List the shims as a table or JSON; shims that do not answer are reported on stderr."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    shims = discover(state, namespace)
    if shims:
        with ThreadPoolExecutor(max_workers=min(_WORKERS, len(shims))) as pool:
            shims = list(pool.map(lambda s: probe(s, timeout), shims))
    if output == "json":
        out.write(json.dumps([asdict(s) for s in shims], indent=2) + "\n")
    else:
        out.write(format_table(shims))
    for shim in shims:
        if shim.error:
            print(f"ttrpc: {shim.namespace}/{shim.id}: {shim.error}", file=err)
    out.flush()
    return 0


_COLUMNS = ("NAMESPACE", "ID", "API", "SHIM", "SHIM PID", "PID", "STATUS", "ADDRESS")


def format_table(shims: Sequence[Shim]) -> str:
    """Aligned columns, one shim per line, with a header."""
    rows = [_COLUMNS] + [
        (
            s.namespace,
            s.id,
            s.runtime,
            s.shim or "-",
            _dash(s.shim_pid),
            _dash(s.pid),
            s.status or ("UNREACHABLE" if s.error else "-"),
            s.address or "-",
        )
        for s in shims
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def _dash(value: int | None) -> str:
    return "-" if not value else str(value)
