"""Shims side by side under one private containerd: memory per shim and `ctr run --rm` time.

    python bench/shim.py [--containers 20] [--runs 10] [--json FILE]

For each runtime (Go's io.containerd.runc.v2 and our io.containerd.pyrunc.v2)
it starts N detached containers, reads every shim's /proc/PID/smaps_rollup
(RSS, PSS, Private_Clean + Private_Dirty, plus the shim's descendants other
than the containers themselves); then the same with all N in one shim group
(the io.containerd.runc.v2.group annotation); then times `ctr run --rm
/bin/true`, the runtimes taking turns. For our runtime it also reads the
per-host zygote that forks the shims (see containerd_shim/zygote.py) and
charges each container its share (zygote PSS / N) in the "per container"
column.
Needs root, containerd, runc and busybox (scripts/setup installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.e2e.containerd import Containerd  # noqa: E402
from tests.e2e.images import build_rootfs  # noqa: E402

RUNTIMES = ["io.containerd.runc.v2", "io.containerd.pyrunc.v2"]


def smaps(pid: int) -> dict[str, float]:
    """RSS, PSS and private memory of one process, in MiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":"):
                values[parts[0][:-1]] = int(parts[1])
    return {
        "rss": values.get("Rss", 0) / 1024,
        "pss": values.get("Pss", 0) / 1024,
        "private": (values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)) / 1024,
    }


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return found


def run_detached(
    cd: Containerd, rootfs: Path, runtime: str, ids: list[str], group: str | None
) -> None:
    for cid in ids:
        argv = ["run", "--runtime", runtime, "-d"]
        if group:
            argv += ["--annotation", f"io.containerd.runc.v2.group={group}"]
        res = cd.ctr(*argv, "--rootfs", str(rootfs), cid, "/bin/sleep", "600", timeout=60)
        if res.returncode != 0:
            raise SystemExit(cd.explain(res, f"{runtime}: run -d failed"))


def remove(cd: Containerd, ids: list[str]) -> None:
    for cid in ids:
        cd.ctr("task", "kill", "-s", "SIGKILL", cid)
    for cid in ids:
        cd.wait_status(cid, ["STOPPED"], timeout=60)
        cd.ctr("task", "delete", cid)
        cd.ctr("container", "delete", cid)


def measure_memory(
    cd: Containerd, rootfs: Path, runtime: str, count: int, grouped: bool = False
) -> dict:
    """Memory of the shims of ``count`` running containers: one shim each, or (``grouped``)
    one shim for all of them (the runc.v2 group annotation)."""
    short = runtime.split(".")[2]
    tag = "grp" if grouped else "mem"
    ids = [cd.track(f"{tag}-{short}-{i}") for i in range(count)]
    run_detached(cd, rootfs, runtime, ids, f"{tag}-{short}" if grouped else None)
    tasks = cd.tasks()
    shims: dict[int, dict[str, float]] = {}
    extra: dict[int, dict[str, float]] = {}
    if grouped:  # one shim, named after the group's first container
        addresses = {(cd.bundle(cid) / "address").read_text() for cid in ids}
        if len(addresses) != 1:
            raise SystemExit(f"{runtime}: grouped containers have {len(addresses)} shims")
    containers = {t.pid for t in tasks.values()}
    for cid in ids[:1] if grouped else ids:
        pids = cd.shim_pids(cid)
        if not pids:
            raise SystemExit(f"{runtime}: no shim found for {cid}")
        shims[pids[0]] = smaps(pids[0])
        # Anything else the shim keeps alive (loggers, helpers), not the containers.
        kept = [p for p in children(pids[0]) if p not in containers]
        extra[pids[0]] = {k: sum(smaps(p)[k] for p in kept) for k in ("rss", "pss", "private")}
    zygote_mem = {"rss": 0.0, "pss": 0.0, "private": 0.0}
    if "pyrunc" in runtime:
        from containerd_shim import zygote

        try:
            zygote_mem = smaps(int(Path(zygote.socket_path() + ".pid").read_text()))
        except (OSError, ValueError):
            print("no zygote found", file=sys.stderr)
    remove(cd, ids)

    def mean(rows: dict[int, dict[str, float]], key: str) -> float:
        return statistics.mean(r[key] for r in rows.values())

    return {
        "runtime": runtime,
        "containers": count,
        "shims": len(shims),
        "shim": {k: mean(shims, k) for k in ("rss", "pss", "private")},
        "kept_alive": {k: mean(extra, k) for k in ("rss", "pss", "private")},
        "zygote": zygote_mem,
    }


def measure_times(cd: Containerd, rootfs: Path, runtimes: list[str], runs: int) -> dict:
    """``ctr run --rm /bin/true`` per runtime, the runtimes taking turns (a load that
    comes and goes on the machine hits them alike); one untimed run each first."""
    times: dict[str, list[float]] = {rt: [] for rt in runtimes}
    for i in range(-1, runs):
        for runtime in runtimes:
            cid = cd.track(f"true-{runtime.split('.')[2]}-{i + 1}")
            start = time.monotonic()
            res = cd.ctr("run", "--runtime", runtime, "--rm", "--rootfs", str(rootfs), cid,
                         "/bin/true", timeout=60)  # fmt: skip
            elapsed = time.monotonic() - start
            if res.returncode != 0:
                raise SystemExit(cd.explain(res, f"{runtime}: run --rm failed"))
            if i >= 0:
                times[runtime].append(elapsed)
    return {
        rt: {"median": statistics.median(t) * 1000, "min": min(t) * 1000, "runs": runs}
        for rt, t in times.items()
    }


def per_container(r: dict) -> float:
    """The shims' PSS (and what they keep alive) per container, plus its share of the zygote."""
    shims = r["shims"] * (r["shim"]["pss"] + r["kept_alive"]["pss"])
    return float((shims + r["zygote"]["pss"]) / r["containers"])


def report(results: list[dict], times: dict) -> str:
    go = results[0]
    lines = [
        "| runtime | shim RSS | shim PSS | shim private | + kept alive (PSS) | zygote PSS "
        "| per container PSS | `ctr run --rm /bin/true` median (min) | PSS vs Go "
        "| time vs Go |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        s, k, z, t = r["shim"], r["kept_alive"], r["zygote"], times[r["runtime"]]
        lines.append(
            f"| {r['runtime']} | {s['rss']:.1f} MiB | {s['pss']:.1f} MiB | {s['private']:.1f} MiB"
            f" | {k['pss']:.1f} MiB | {z['pss']:.1f} MiB | {per_container(r):.1f} MiB"
            f" | {t['median']:.0f} ms ({t['min']:.0f}) "
            f"| {per_container(r) / per_container(go):.2f}x "
            f"| {t['median'] / times[go['runtime']]['median']:.2f}x |"
        )
    return "\n".join(lines)


def report_grouped(results: list[dict]) -> str:
    go = results[0]
    lines = [
        "| runtime (all containers in one group) | shims | shim PSS | shim private | zygote PSS "
        "| per container PSS | vs Go |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        s, z = r["shim"], r["zygote"]
        lines.append(
            f"| {r['runtime']} | {r['shims']} | {s['pss']:.1f} MiB | {s['private']:.1f} MiB"
            f" | {z['pss']:.1f} MiB | {per_container(r):.2f} MiB"
            f" | {per_container(r) / per_container(go):.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/shim.py needs root", file=sys.stderr)
        return 1
    cd = Containerd.create(namespace=f"bench-{os.getpid()}")
    try:
        rootfs = build_rootfs(cd.tmp / "rootfs")
        cd.start()
        results, grouped = [], []
        for runtime in RUNTIMES:
            print(f"measuring {runtime} ...", file=sys.stderr)
            results.append(measure_memory(cd, rootfs, runtime, args.containers))
            grouped.append(measure_memory(cd, rootfs, runtime, args.containers, grouped=True))
        print("timing ctr run --rm ...", file=sys.stderr)
        times = measure_times(cd, rootfs, RUNTIMES, args.runs)
    finally:
        cd.cleanup()
    print(f"{args.containers} containers running per runtime, {args.runs} timed runs each\n")
    print(report(results, times))
    print(f"\nShim grouping: {args.containers} containers sharing one shim\n")
    print(report_grouped(grouped))
    if args.json:
        data = {"one_shim_each": results, "grouped": grouped, "run_rm_ms": times}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
