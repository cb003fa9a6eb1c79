"""Fixtures for the shim client tests: a busybox rootfs, a namespace of our own, bundles."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.images import BUSYBOX, build_rootfs

from .helpers import GO_V1_SHIM, GO_V2_SHIM, RUNC, RUNC_ROOT, BundleDir, bundle_dir, new_id


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the shim client tests need root"
    for path in (RUNC, BUSYBOX, GO_V1_SHIM, GO_V2_SHIM):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{path} not installed"
    if not shutil.which("unshare"):
        return "unshare (util-linux) not installed"
    return None


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _missing()
    if missing:
        pytest.skip(missing)
    return build_rootfs(tmp_path_factory.mktemp("shimclient") / "rootfs")


@pytest.fixture(scope="session")
def namespace() -> Iterator[str]:
    ns = f"shimclient-{os.getpid()}"
    yield ns
    # Containers a failed test left, then the per-namespace state directory runc
    # leaves behind (as it does under containerd).
    root = RUNC_ROOT / ns
    if root.is_dir():
        for cid in os.listdir(root):
            subprocess.run(
                [RUNC, "--root", str(root), "delete", "--force", cid],
                capture_output=True,
                timeout=15,
                check=False,
            )
    with contextlib.suppress(OSError):
        root.rmdir()


@pytest.fixture
def bundle(rootfs: Path) -> Iterator[BundleDir]:
    with bundle_dir(rootfs, new_id()) as b:
        yield b
