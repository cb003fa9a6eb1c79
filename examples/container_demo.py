"""The README's main job: real containers through our Python shim, under a private containerd.

    python examples/container_demo.py

Starts containerd 1.6 (Debian's) with its own state in a temp dir, builds a
busybox rootfs, and drives containers with ``ctr --runtime io.containerd.pyrunc.v2``:
a foreground run, a detached one with an exec, pause/resume, metrics and the
shim's memory. Everything is removed on exit. Needs root.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.containerd import Containerd  # noqa: E402
from tests.e2e.images import build_rootfs  # noqa: E402

RUNTIME = "io.containerd.pyrunc.v2"


def step(title: str) -> None:
    print(f"\n== {title}")


def show(res: object) -> None:
    out = (getattr(res, "stdout", "") or "") + (getattr(res, "stderr", "") or "")
    for line in out.rstrip().splitlines():
        print(f"   {line}")


def smaps(pid: int) -> str:
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in ("Rss:", "Pss:", "Private_Clean:", "Private_Dirty:"):
                values[parts[0][:-1]] = int(parts[1]) / 1024
    private = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return f"RSS {values['Rss']:.1f} MiB, PSS {values['Pss']:.1f} MiB, private {private:.1f} MiB"


def main() -> int:
    if os.geteuid() != 0:
        print("containers need root", file=sys.stderr)
        return 1
    cd = Containerd.create(namespace=f"demo-{os.getpid()}")
    try:
        rootfs = build_rootfs(cd.tmp / "rootfs")
        cd.start()
        version = cd.ctr("version", check=True).stdout.split("Server:")[-1].split()
        print(f"containerd {version[1] if len(version) > 1 else '?'} running in {cd.tmp}")

        step("ctr run --rm: a container through the Python shim")
        res = cd.ctr(
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            "--rootfs",
            str(rootfs),
            cd.track("hello"),
            "/bin/sh",
            "-c",
            "echo hello from $(hostname); id; uname -sr; exit 3",
        )
        show(res)
        print(f"   exit status: {res.returncode}")

        step("a detached container, an exec, ps, pause/resume")
        cid = cd.track("web")
        cd.ctr(
            "run",
            "--runtime",
            RUNTIME,
            "-d",
            "--rootfs",
            str(rootfs),
            cid,
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; while :; do sleep 1; done",
            check=True,
        )
        show(cd.ctr("task", "ls"))
        show(cd.ctr("task", "exec", "--exec-id", "probe", cid, "/bin/ps", "-o", "pid,comm"))
        cd.ctr("task", "pause", cid, check=True)
        print(f"   after pause:  {cd.task_status(cid)}")
        cd.ctr("task", "resume", cid, check=True)
        print(f"   after resume: {cd.task_status(cid)}")
        shim = cd.shim_pids(cid)
        if shim:
            print(f"   shim pid {shim[0]}: {smaps(shim[0])}")

        step("metrics (cgroup v1, as `ctr task metrics` decodes them)")
        show(cd.ctr("task", "metrics", cid))

        step("stop and delete")
        cd.ctr("task", "kill", cid, check=True)
        cd.wait_status(cid, ["STOPPED"], timeout=30)
        cd.ctr("task", "delete", cid, check=True)
        cd.ctr("container", "delete", cid, check=True)
        show(cd.ctr("task", "ls"))

        step("ctr run --rm /bin/true: Go's runc shim and ours")
        for runtime in ("io.containerd.runc.v2", RUNTIME):
            times = []
            for i in range(3):
                start = time.monotonic()
                res = cd.ctr(
                    "run",
                    "--runtime",
                    runtime,
                    "--rm",
                    "--rootfs",
                    str(rootfs),
                    cd.track(f"true-{runtime.split('.')[2]}-{i}"),
                    "/bin/true",
                )
                times.append(time.monotonic() - start)
                if res.returncode != 0:
                    show(res)
            print(f"   {runtime:<24} best of 3: {min(times) * 1000:.0f} ms")
        return 0
    finally:
        cd.cleanup()


if __name__ == "__main__":
    sys.exit(main())
