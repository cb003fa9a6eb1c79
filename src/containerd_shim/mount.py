"""Mounting a task's rootfs and taking it down again, with mount(8)/umount(8)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Protocol

from containerd_shim.mountinfo import mounted
from containerd_shim.reaper import Reaper

log = logging.getLogger("containerd_shim")

__all__ = ["MountSpec", "mount_all", "mounted", "unmount_all"]


class MountSpec(Protocol):
    """containerd.types.Mount: what the snapshotter says to mount."""

    @property
    def type(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def options(self) -> Iterable[str]: ...


class MountError(Exception):
    pass


def _run(reaper: Reaper, argv: list[str]) -> tuple[int, str]:
    err_fd = os.memfd_create("mount-stderr", os.MFD_CLOEXEC)
    try:
        exit_ = reaper.spawn(argv, stdout=err_fd, stderr=err_fd).wait()
        assert exit_ is not None
        os.lseek(err_fd, 0, os.SEEK_SET)
        return exit_.status, os.read(err_fd, 8192).decode(errors="replace").strip()
    finally:
        os.close(err_fd)


def mount_all(reaper: Reaper, mounts: Iterable[MountSpec], target: str) -> None:
    """Mount each entry on ``target`` in order (later ones stack on earlier ones)."""
    for m in mounts:
        options = [o for o in m.options if o]
        argv = ["mount"]
        # "bind" is not a filesystem type for mount(8): the bind/rbind option says it.
        if m.type and m.type != "bind":
            argv += ["-t", m.type]
        if options:
            argv += ["-o", ",".join(options)]
        argv += ["--", m.source, target]
        status, err = _run(reaper, argv)
        if status != 0:
            raise MountError(f"mount {m.type} {m.source} on {target}: {err or f'status {status}'}")


def unmount_all(reaper: Reaper, target: str) -> None:
    """Unmount everything stacked on ``target`` (no-op when nothing is mounted)."""
    for _ in range(64):
        if not mounted(target):
            return
        status, err = _run(reaper, ["umount", target])
        if status != 0:
            # Busy: detach it instead, so a stuck reader cannot keep the rootfs.
            status, err = _run(reaper, ["umount", "--lazy", target])
            if status != 0:
                raise MountError(f"umount {target}: {err}")
    log.warning("still mounted after 64 unmounts: %s", target)
