"""Build a busybox rootfs and an OCI image archive of it, in pure Python."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

BUSYBOX = "/bin/busybox"
EMPTY_DIRS = ("proc", "sys", "dev", "tmp", "etc", "run", "root", "var")
IMAGE_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"

_GOARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def goarch() -> str:
    machine = platform.machine()
    return _GOARCH.get(machine, machine)


def build_rootfs(dest: Path, busybox: str = BUSYBOX) -> Path:
    """Create a minimal busybox rootfs in ``dest``: bin/busybox, one symlink per applet."""
    bindir = dest / "bin"
    bindir.mkdir(parents=True)
    shutil.copy2(busybox, bindir / "busybox")
    applets = subprocess.run(
        [busybox, "--list"], check=True, capture_output=True, text=True, timeout=10
    ).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            (bindir / applet).symlink_to("busybox")
    for name in EMPTY_DIRS:
        (dest / name).mkdir(exist_ok=True)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")
    return dest


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def layer_tar(rootfs: Path) -> bytes:
    """An uncompressed, deterministic layer tarball of ``rootfs``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(rootfs)
            if rel_dir != Path("."):
                tar.add(dirpath, arcname=str(rel_dir), recursive=False, filter=_normalise)
            links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
            for name in sorted(filenames + links):
                path = Path(dirpath) / name
                tar.add(path, arcname=str(rel_dir / name), recursive=False, filter=_normalise)
    return buf.getvalue()


def _blob(data: bytes) -> tuple[str, int]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), len(data)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_oci_archive(rootfs: Path, dest: Path, name: str) -> Path:
    """Write an OCI image-layout tar of ``rootfs`` to ``dest``, named ``name`` for containerd."""
    arch = goarch()
    layer = layer_tar(rootfs)
    layer_digest, layer_size = _blob(layer)
    config = _json(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": [IMAGE_PATH_ENV], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created_by": "tests/e2e/images.py"}],
        }
    )
    config_digest, config_size = _blob(config)
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": MT_LAYER, "digest": layer_digest, "size": layer_size}],
        }
    )
    manifest_digest, manifest_size = _blob(manifest)
    index = _json(
        {
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [
                {
                    "mediaType": MT_MANIFEST,
                    "digest": manifest_digest,
                    "size": manifest_size,
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rpartition(":")[2],
                    },
                }
            ],
        }
    )
    entries: list[tuple[str, bytes]] = [
        ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
        ("index.json", index),
    ]
    for data in (layer, config, manifest):
        entries.append(("blobs/sha256/" + hashlib.sha256(data).hexdigest(), data))
    with tarfile.open(dest, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirname in ("blobs", "blobs/sha256"):
            info = _normalise(tarfile.TarInfo(dirname))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for arcname, data in entries:
            info = _normalise(tarfile.TarInfo(arcname))
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return dest
