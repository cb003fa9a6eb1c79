"""Where `ctr run --rm /bin/true` time goes, for Go's runc.v2 shim and ours, side by side.

    python bench/shim_phases.py [--runs 20] [--settle 0.3]

One private containerd; each shim binary is wrapped by a /bin/sh script that stamps
the clock (`date +%s%N`) before and after running it, and the bench stamps each `ctr run`
before and after. The two runtimes take turns. Printed: medians of each phase,

    ctr → start      from `ctr run` to containerd running the shim's `start`
    start            the `start` binary (for ours: interpreter, imports, asking the zygote)
    start → delete   create, start, exit, delete and shutdown over ttrpc, then containerd
                     running the binary's `delete` (it does after every shim disconnects)
    delete           the `delete` binary
    delete → done    until `ctr` returns

A stamp costs the time to start `date` (~1 ms): every phase carries about one, alike for
both shims. Needs root, containerd, runc and busybox (scripts/setup installs them).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "src")]

from tests.e2e.containerd import PYRUNC_SHIM, Containerd  # noqa: E402
from tests.e2e.images import build_rootfs  # noqa: E402

GO_SHIM = shutil.which("containerd-shim-runc-v2") or "/usr/bin/containerd-shim-runc-v2"
RUNTIMES = {"io.containerd.runc.v2": "Go", "io.containerd.pyrunc.v2": "ours"}
PHASES = ("ctr → start", "start", "start → delete", "delete", "delete → done", "total")


def wrap(binary: Path, real: Path, log: Path) -> None:
    """Replace ``binary`` by a script that stamps ``log`` around running ``real``."""
    stamp = f'echo "$(date +%s%N) $1 $label" >> {shlex.quote(str(log))}'
    binary.write_text(
        "#!/bin/sh\n"
        'for label; do :; done  # the last argument: start, delete (the daemon: none)\n'
        + stamp.replace("$1", "begin") + "\n"
        + f'{shlex.quote(str(real))} "$@"; rc=$?\n'
        + stamp.replace("$1", "end") + "\n"
        + "exit $rc\n"
    )  # fmt: skip
    binary.chmod(0o755)


def phases(lines: list[str]) -> dict[str, float]:
    at: dict[str, int] = {}
    for line in lines:
        ns, what, label = line.split()
        at.setdefault(f"{what} {label}", int(ns))
    ms = {
        "ctr → start": at["begin start"] - at["begin ctr"],
        "start": at["end start"] - at["begin start"],
        "start → delete": at["begin delete"] - at["end start"],
        "delete": at["end delete"] - at["begin delete"],
        "delete → done": at["end ctr"] - at["end delete"],
        "total": at["end ctr"] - at["begin ctr"],
    }
    return {k: v / 1e6 for k, v in ms.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--settle", type=float, default=0.3,
                        help="seconds between runs, so that neither shim pays for what the other "
                        "leaves running after its run")  # fmt: skip
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/shim_phases.py needs root", file=sys.stderr)
        return 1
    cd = Containerd.create(namespace=f"phases-{os.getpid()}")
    logs = {rt: cd.tmp / f"{rt}.log" for rt in RUNTIMES}
    ours = cd.bin_dir / PYRUNC_SHIM
    ours.rename(cd.bin_dir / f"{PYRUNC_SHIM}.real")
    wrap(ours, cd.bin_dir / f"{PYRUNC_SHIM}.real", logs["io.containerd.pyrunc.v2"])
    # Go's shim is found on PATH by its name; ours comes first on containerd's PATH.
    wrap(cd.bin_dir / Path(GO_SHIM).name, Path(GO_SHIM), logs["io.containerd.runc.v2"])
    results: dict[str, list[dict[str, float]]] = {rt: [] for rt in RUNTIMES}
    try:
        rootfs = build_rootfs(cd.tmp / "rootfs")
        cd.start()
        for i in range(-1, args.runs):  # one untimed run each first
            for rt in RUNTIMES:
                time.sleep(args.settle)
                log = logs[rt]
                log.write_text(f"{time.time_ns()} begin ctr\n")
                cid = cd.track(f"ph-{RUNTIMES[rt]}-{i + 1}")
                res = cd.ctr("run", "--runtime", rt, "--rm", "--rootfs", str(rootfs), cid,
                             "/bin/true", timeout=60)  # fmt: skip
                with log.open("a") as f:
                    f.write(f"{time.time_ns()} end ctr\n")
                if res.returncode != 0:
                    raise SystemExit(cd.explain(res, f"{rt}: run --rm failed"))
                if i >= 0:
                    results[rt].append(phases(log.read_text().splitlines()))
    finally:
        cd.cleanup()
    print(f"`ctr run --rm /bin/true`, {args.runs} runs each, medians in ms\n")
    print("| phase | " + " | ".join(RUNTIMES.values()) + " | ours - Go |")
    print("|---|" + "--:|" * (len(RUNTIMES) + 1))
    for phase in PHASES:
        go, py = (statistics.median(r[phase] for r in results[rt]) for rt in RUNTIMES)
        print(f"| {phase} | {go:.1f} | {py:.1f} | {py - go:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
