"""Minimal OCI runtime specs (``config.json``) for running a command in a rootfs directory.

The defaults follow containerd's default spec (``oci.WithDefaultSpec``): the
usual namespaces (a new network namespace, with loopback only), proc, sysfs,
/dev and cgroup mounts, containerd's default capabilities, masked and
read-only /proc paths, and no device access beyond runc's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_ENV", "oci_spec", "process_spec"]

DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)

_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

_MASKED = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]

_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def _mounts() -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": []},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]


def process_spec(
    args: Sequence[str],
    *,
    env: Sequence[str] = (),
    terminal: bool = False,
    cwd: str = "/",
    uid: int = 0,
    gid: int = 0,
) -> dict[str, Any]:
    """An OCI ``process`` (what ``Exec`` takes as its spec, as JSON).

    ``env`` entries (``KEY=VALUE``) are added to the default PATH; a later entry
    for the same key wins. ``TERM=xterm`` is added for a terminal.
    """
    if not args:
        raise ValueError("a process needs a command")
    merged: dict[str, str] = {}
    for entry in [*DEFAULT_ENV, *(["TERM=xterm"] if terminal else []), *env]:
        key, sep, _ = entry.partition("=")
        if not key or not sep:
            raise ValueError(f"environment entry {entry!r} is not KEY=VALUE")
        merged[key] = entry
    return {
        "terminal": terminal,
        "user": {"uid": uid, "gid": gid},
        "args": list(args),
        "env": list(merged.values()),
        "cwd": cwd,
        "capabilities": {
            kind: list(_CAPABILITIES) for kind in ("bounding", "effective", "permitted")
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }


def oci_spec(
    rootfs: str,
    args: Sequence[str],
    *,
    env: Sequence[str] = (),
    terminal: bool = False,
    hostname: str = "",
    cwd: str = "/",
    readonly: bool = False,
    cgroups_path: str = "",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A ``config.json`` running ``args`` in the directory ``rootfs`` (made absolute)."""
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2-dev",
        "process": process_spec(args, env=env, terminal=terminal, cwd=cwd),
        "root": {"path": os.path.abspath(rootfs), "readonly": readonly},
        "hostname": hostname,
        "mounts": _mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": kind} for kind in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": list(_MASKED),
            "readonlyPaths": list(_READONLY),
        },
    }
    if cgroups_path:
        spec["linux"]["cgroupsPath"] = cgroups_path
    if annotations:
        spec["annotations"] = dict(annotations)
    return spec
