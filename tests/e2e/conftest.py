"""Fixtures: a private containerd, a busybox rootfs and image, and the runtimes under test.

``E2E_PYRUNC=1`` adds our Python shim (``io.containerd.pyrunc.v2``) to the runtimes; without it
only Go's reference shim (``io.containerd.runc.v2``) runs. The list is built at collection time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .containerd import CONTAINERD, CTR, RUNC, Containerd
from .harness import E2E, slug
from .images import BUSYBOX, build_oci_archive, build_rootfs

GO_RUNTIME = "io.containerd.runc.v2"
PY_RUNTIME = "io.containerd.pyrunc.v2"
RUNTIMES = [GO_RUNTIME] + ([PY_RUNTIME] if os.environ.get("E2E_PYRUNC") == "1" else [])
IMAGE_NAME = "localhost/busybox:test"


def _runtime_id(runtime: str) -> str:
    return runtime.split(".")[2]  # "runc" / "pyrunc"


def _prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "end-to-end tests need root"
    for path in (CONTAINERD, CTR, RUNC, BUSYBOX):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{path} not installed"
    return None


@pytest.fixture(scope="session")
def namespace() -> str:
    return f"e2e-{os.getpid()}"


@pytest.fixture(scope="session")
def containerd(namespace: str) -> Iterator[Containerd]:
    missing = _prerequisites()
    if missing:
        pytest.skip(missing)
    cd = Containerd.create(namespace)
    try:
        cd.start()
        yield cd
    finally:
        cd.cleanup()


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} not installed")
    return build_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture(scope="session")
def image(containerd: Containerd, rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    archive = build_oci_archive(
        rootfs, tmp_path_factory.mktemp("image") / "busybox.tar", IMAGE_NAME
    )
    res = containerd.ctr("images", "import", str(archive), timeout=60)
    assert res.returncode == 0, containerd.explain(res, "image import failed")
    listed = containerd.ctr("images", "ls", "-q", check=True).stdout.split()
    assert IMAGE_NAME in listed, f"{IMAGE_NAME} not in {listed}"
    return IMAGE_NAME


@pytest.fixture(params=RUNTIMES, ids=_runtime_id)
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def e2e(
    containerd: Containerd, runtime: str, image: str, rootfs: Path, request: pytest.FixtureRequest
) -> Iterator[E2E]:
    if not containerd.running:  # a previous test killed it: do not fail every later test
        containerd.restart()
    name = request.node.originalname.removeprefix("test_")
    env = E2E(
        cd=containerd,
        runtime=runtime,
        image=image,
        rootfs=rootfs,
        name=f"{slug(name, 20)}-{_runtime_id(runtime)}",
    )
    try:
        yield env
    finally:
        env.cleanup()
