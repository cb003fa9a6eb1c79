"""Cgroup filesystems: the mounts, a process's cgroups, and joining a cgroup.

Standard library only, and no protobuf: ``start`` (one fresh interpreter per
container) uses :func:`add_process_to_cgroup` for the runc options'
``shim_cgroup``; :mod:`containerd_shim.cgroups` builds metrics and OOM
watching on top of it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from containerd_shim.mountinfo import unescape

__all__ = [
    "V1_CONTROLLERS",
    "Mount",
    "add_process_to_cgroup",
    "is_v1",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "read_mounts",
    "read_text",
    "under",
    "v1_hierarchies",
]

# The v1 controllers (as opposed to mount options such as "rw" or "name=systemd").
V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)


# --------------------------------------------------------------------------- mounts


class Mount(NamedTuple):
    """One cgroup filesystem mount from mountinfo."""

    mountpoint: str
    #: The cgroup path of the hierarchy that is mounted (``/`` unless in a cgroup namespace).
    root: str
    #: 1 for a ``cgroup`` mount, 2 for ``cgroup2``.
    version: int
    #: v1: the superblock options (controllers such as ``memory`` and ``name=systemd``,
    #: plus flags like ``rw``); v2: empty.
    options: frozenset[str] = frozenset()
    #: ``major:minor`` of the mount: one per hierarchy, the same for its bind mounts.
    device: str = ""

    def has(self, controller: str) -> bool:
        """Whether this v1 hierarchy carries ``controller``."""
        return controller in self.options


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in a mountinfo file, in order."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        fstype = fields[sep + 1]
        if fstype == "cgroup":
            version = 1
            options = frozenset(fields[sep + 3].split(","))
        elif fstype == "cgroup2":
            version = 2
            options = frozenset()
        else:
            continue
        mounts.append(
            Mount(
                mountpoint=unescape(fields[4]),
                root=unescape(fields[3]),
                version=version,
                options=options,
                device=fields[2],
            )
        )
    return mounts


def read_mounts(proc_root: str = "/proc") -> list[Mount]:
    """The cgroup mounts of this process (``<proc_root>/self/mountinfo``)."""
    with open(os.path.join(proc_root, "self", "mountinfo"), encoding="utf-8") as f:
        return parse_mountinfo(f.read())


def is_v1(mounts: Iterable[Mount]) -> bool:
    """Whether cgroup v1 controllers are mounted (v1 or hybrid host) — then v1 is used."""
    return any(m.version == 1 and not m.options.isdisjoint(V1_CONTROLLERS) for m in mounts)


def v1_hierarchies(mounts: Iterable[Mount]) -> list[Mount]:
    """One mount per v1 hierarchy (bind mounts of the same hierarchy skipped)."""
    seen: set[str] = set()
    out: list[Mount] = []
    for m in mounts:
        if m.version != 1:
            continue
        key = m.device or m.mountpoint
        if key in seen:
            continue
        seen.add(key)
        out.append(m)
    return out


def under(mount: Mount, cgroup_path: str) -> str:
    """The directory of ``cgroup_path`` (as /proc/PID/cgroup shows it) below ``mount``."""
    root = mount.root.rstrip("/")
    rel = cgroup_path
    if root and (cgroup_path == root or cgroup_path.startswith(root + "/")):
        rel = cgroup_path[len(root) :]
    return os.path.join(mount.mountpoint, rel.lstrip("/"))


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """Parse /proc/PID/cgroup: ``({v1 controller or "name=X": path}, v2 path or None)``."""
    v1: dict[str, str] = {}
    unified: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2]
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        if parts[1] == "":
            unified = path
            continue
        for name in parts[1].split(","):
            if name:
                v1[name] = path
    return v1, unified


def read_text(path: str) -> str | None:
    """A file's text, or None if it (or its cgroup) does not exist."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENOTDIR, errno.ESRCH):
            return None
        raise


# --------------------------------------------------------------------------- joining


def _init_cpuset(directory: str) -> None:
    """Give a new v1 cpuset cgroup its parent's cpus and mems (empty ones refuse tasks)."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        path = os.path.join(directory, name)
        current = read_text(path)
        if current is None or current.strip():
            continue
        parent = os.path.dirname(directory)
        value = ""
        while True:
            value = (read_text(os.path.join(parent, name)) or "").strip()
            if value or os.path.dirname(parent) == parent:
                break
            parent = os.path.dirname(parent)
        if not value:
            continue
        # Ancestors between the root and this one may be empty too: fill top-down.
        chain = []
        d = directory
        while d != parent:
            chain.append(d)
            d = os.path.dirname(d)
        for d in reversed(chain):
            p = os.path.join(d, name)
            if not (read_text(p) or "").strip():
                _write(p, value)


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def add_process_to_cgroup(path: str, pid: int, *, mounts: Sequence[Mount] | None = None) -> None:
    """Move ``pid`` into the cgroup ``path`` (e.g. runc options' ``shim_cgroup``).

    v1 (and hybrid) hosts: the pid is written to ``cgroup.procs`` of ``path`` in
    every mounted v1 hierarchy; v2: in the cgroup2 hierarchy. Missing
    directories are created. Raises OSError on failure.
    """
    if pid <= 0:
        raise ValueError(f"invalid pid {pid}")
    if mounts is None:
        mounts = read_mounts()
    rel = path.strip("/")
    if is_v1(mounts):
        targets = [(m, os.path.join(m.mountpoint, rel)) for m in v1_hierarchies(mounts)]
    else:
        targets = [(m, os.path.join(m.mountpoint, rel)) for m in mounts if m.version == 2][:1]
    if not targets:
        raise OSError(errno.ENOENT, "no cgroup hierarchy mounted")
    for m, d in targets:
        os.makedirs(d, exist_ok=True)
        if m.version == 1 and m.has("cpuset"):
            _init_cpuset(d)
        _write(os.path.join(d, "cgroup.procs"), str(pid))
