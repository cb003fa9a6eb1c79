"""The shim client without containerd: one container through each shim we have.

    python examples/shim_client.py

Builds a busybox rootfs in a temp dir, then for our v1 and v2 shims and Debian's Go
``containerd-shim`` (v1) and ``containerd-shim-runc-v2``: starts the shim, creates and
starts a container whose output goes to a fifo, execs a process in it, waits, deletes
it and stops the shim. Everything is removed on exit. Needs root, runc and busybox-static.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from containerd_shim import client  # noqa: E402
from containerd_shim.spec import process_spec  # noqa: E402
from tests.e2e.images import build_rootfs  # noqa: E402
from tests.shim_client.helpers import (  # noqa: E402
    GO_V1_SHIM,
    GO_V2_SHIM,
    BundleDir,
    bundle_dir,
    start_shim,
)

SHIMS = {
    "py-v1": "ours, v1 protocol (fd 3, the v1 flags)",
    "py-v2": "ours, v2 protocol (start/delete commands)",
    "go-v1": f"Go's {GO_V1_SHIM}",
    "go-v2": f"Go's {GO_V2_SHIM}",
}


def run(kind: str, b: BundleDir, namespace: str) -> None:
    b.write_spec(["/bin/sh", "-c", "echo hello from $(hostname); sleep 1000 & wait"], hostname=kind)
    out = b.reader("out")
    started = time.monotonic()
    shim = start_shim(kind, b, b.cid, namespace)
    with shim:
        shim.create(b.cid, b.bundle, client.IO(stdout=out.path, stderr=out.path))
        shim.start(b.cid)
        out.wait_for(b"hello")
        ex_out = b.reader("exec")
        ps = process_spec(["/bin/sh", "-c", "echo exec sees $(ls /proc | grep -c '^[0-9]') pids"])
        shim.exec(b.cid, "e1", ps, client.IO(stdout=ex_out.path, stderr=ex_out.path))
        shim.start(b.cid, "e1")
        shim.wait(b.cid, "e1", timeout=10)
        ex_out.wait_for(b"pids")
        shim.delete(b.cid, "e1")
        shim.kill(b.cid, 9)
        status = shim.wait(b.cid, timeout=10).status
        shim.delete(b.cid)
        shim_pid = shim.shim_pid()
        shim.shutdown()
    took = time.monotonic() - started
    print(f"== {kind}: {SHIMS[kind]} (shim pid {shim_pid})")
    for line in (out.data + ex_out.data).decode().splitlines():
        print(f"   {line}")
    print(f"   exit status {status}; {took * 1000:.0f} ms from shim start to shim gone")


def main() -> int:
    if os.geteuid() != 0:
        print("containers need root", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="shim-example-"))
    namespace = f"example-{os.getpid()}"
    try:
        rootfs = build_rootfs(tmp / "rootfs")
        for kind in SHIMS:
            with bundle_dir(rootfs, f"{kind}-{os.getpid()}") as b:
                run(kind, b, namespace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with_runc_root = Path("/run/containerd/runc") / namespace
        if with_runc_root.is_dir():
            with_runc_root.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
