"""Shims side by side under private containerds: memory per shim and `ctr run --rm` time.

    python bench/shim.py [--containers 20] [--runs 10] [--no-v1] [--json FILE]

Four shims: Go's io.containerd.runc.v2 and our io.containerd.pyrunc.v2 under one
containerd, and containerd's v1 runtime (io.containerd.runtime.v1.linux) with Go's
`containerd-shim` and with our `containerd-shim-pyrunc-v1`, each under a containerd of
its own (the v1 shim binary is containerd configuration). For each it starts N detached
containers and reads every shim's /proc/PID/smaps_rollup (RSS, PSS, Private_Clean +
Private_Dirty, plus the shim's descendants other than the containers themselves); for
the v2 shims then the same with all N in one shim group (the io.containerd.runc.v2.group
annotation); then it times `ctr run --rm /bin/true`, the shims taking turns. For our v2
runtime it also reads the per-host zygote that forks the shims, with the spare daemon it
keeps forked ahead of the next start (see containerd_shim/zygote.py), and charges each
container its share (zygote PSS / N) in the
"per container" column. Ratios compare each shim with Go's shim of the same API.
Needs root, containerd, runc and busybox (scripts/setup installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.e2e.containerd import (  # noqa: E402
    GO_V1_SHIM,
    V1_RUNTIME,
    Containerd,
    shim_python,
    zygote_socket_path,
    zygote_spares,
)
from tests.e2e.images import build_rootfs  # noqa: E402


@dataclass
class Shim:
    """One shim under test: its label, the containerd that runs it and how to find it."""

    label: str
    cd: Containerd
    runtime: str
    find: Callable[[Containerd, str], int | None]
    go: bool

    @property
    def short(self) -> str:
        return self.label.split()[0].replace("/", "-")


def v2_shim_pid(cd: Containerd, container_id: str) -> int | None:
    pids = cd.shim_pids(container_id)
    return pids[0] if pids else None


def v1_shim_pid(cd: Containerd, container_id: str) -> int | None:
    try:
        path = cd.state / V1_RUNTIME / cd.namespace / container_id / "shim.pid"
        return int(path.read_text())
    except (OSError, ValueError):
        return None


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


def run_detached(shim: Shim, rootfs: Path, ids: list[str], group: str | None) -> None:
    for cid in ids:
        argv = ["run", "--runtime", shim.runtime, "-d"]
        if group:
            argv += ["--annotation", f"io.containerd.runc.v2.group={group}"]
        res = shim.cd.ctr(*argv, "--rootfs", str(rootfs), cid, "/bin/sleep", "600", timeout=60)
        if res.returncode != 0:
            raise SystemExit(shim.cd.explain(res, f"{shim.label}: run -d failed"))


def remove(cd: Containerd, ids: list[str]) -> None:
    for cid in ids:
        cd.ctr("task", "kill", "-s", "SIGKILL", cid)
    for cid in ids:
        cd.wait_status(cid, ["STOPPED"], timeout=60)
        cd.ctr("task", "delete", cid)
        cd.ctr("container", "delete", cid)


def measure_memory(shim: Shim, rootfs: Path, count: int, grouped: bool = False) -> dict[str, Any]:
    """Memory of the shims of ``count`` running containers: one shim each, or (``grouped``)
    one shim for all of them (the runc.v2 group annotation)."""
    cd = shim.cd
    tag = "grp" if grouped else "mem"
    ids = [cd.track(f"{tag}-{shim.short}-{i}") for i in range(count)]
    run_detached(shim, rootfs, ids, f"{tag}-{shim.short}" if grouped else None)
    tasks = cd.tasks()
    if grouped:  # one shim, named after the group's first container
        addresses = {(cd.bundle(cid) / "address").read_text() for cid in ids}
        if len(addresses) != 1:
            raise SystemExit(f"{shim.label}: grouped containers have {len(addresses)} shims")
    containers = {t.pid for t in tasks.values()}
    shims: dict[int, dict[str, float]] = {}
    extra: dict[int, dict[str, float]] = {}
    for cid in ids[:1] if grouped else ids:
        pid = shim.find(cd, cid)
        if pid is None:
            raise SystemExit(f"{shim.label}: no shim found for {cid}")
        shims[pid] = smaps(pid)
        # Anything else the shim keeps alive (loggers, helpers), not the containers.
        kept = [p for p in children(pid) if p not in containers]
        extra[pid] = {k: sum(smaps(p)[k] for p in kept) for k in ("rss", "pss", "private")}
    zygote_mem = {"rss": 0.0, "pss": 0.0, "private": 0.0}
    if shim.runtime == "io.containerd.pyrunc.v2":
        try:
            zygote_pid = int(Path(zygote_socket_path() + ".pid").read_text())
            # The zygote and the spare daemon it keeps forked ahead of the next start.
            for pid in [zygote_pid, *zygote_spares(zygote_pid)]:
                for key, value in smaps(pid).items():
                    zygote_mem[key] += value
        except (OSError, ValueError, subprocess.CalledProcessError):
            print("no zygote found", file=sys.stderr)
    remove(cd, ids)

    def mean(rows: dict[int, dict[str, float]], key: str) -> float:
        return statistics.mean(r[key] for r in rows.values())

    return {
        "shim": shim.label,
        "runtime": shim.runtime,
        "go": shim.go,
        "containers": count,
        "shims": len(shims),
        "memory": {k: mean(shims, k) for k in ("rss", "pss", "private")},
        "kept_alive": {k: mean(extra, k) for k in ("rss", "pss", "private")},
        "zygote": zygote_mem,
    }


def measure_times(
    shims: list[Shim], rootfs: Path, runs: int, settle: float = 0.3
) -> dict[str, dict[str, float]]:
    """``ctr run --rm /bin/true`` per shim, the shims taking turns (a load that comes and
    goes on the machine hits them alike); one untimed run each first."""
    times: dict[str, list[float]] = {s.label: [] for s in shims}
    for i in range(-1, runs):
        for shim in shims:
            # A pause first: neither shim pays for what another does after its run
            # (containerd cleans up after a shim; our zygote forks its next spare).
            time.sleep(settle)
            cid = shim.cd.track(f"true-{shim.short}-{i + 1}")
            start = time.monotonic()
            res = shim.cd.ctr("run", "--runtime", shim.runtime, "--rm", "--rootfs", str(rootfs),
                              cid, "/bin/true", timeout=60)  # fmt: skip
            elapsed = time.monotonic() - start
            if res.returncode != 0:
                raise SystemExit(shim.cd.explain(res, f"{shim.label}: run --rm failed"))
            if i >= 0:
                times[shim.label].append(elapsed)
    return {
        label: {"median": statistics.median(t) * 1000, "min": min(t) * 1000, "runs": runs}
        for label, t in times.items()
    }


def per_container(r: dict[str, Any]) -> float:
    """The shims' PSS (and what they keep alive) per container, plus its share of the zygote."""
    shims = r["shims"] * (r["memory"]["pss"] + r["kept_alive"]["pss"])
    return float((shims + r["zygote"]["pss"]) / r["containers"])


def _reference(results: list[dict[str, Any]], r: dict[str, Any]) -> dict[str, Any]:
    """Go's shim of the same API version as ``r``."""
    v1 = r["runtime"] == V1_RUNTIME
    return next(g for g in results if g["go"] and (g["runtime"] == V1_RUNTIME) == v1)


def _mib(value: float) -> str:
    return f"{value:.1f} MiB" if value else "-"


def report(results: list[dict[str, Any]], times: dict[str, dict[str, float]]) -> str:
    lines = [
        "| shim | shim RSS | shim PSS | shim private | + kept alive (PSS) | zygote PSS "
        "| per container PSS | `ctr run --rm /bin/true` median (min) | PSS vs Go "
        "| time vs Go |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        go = _reference(results, r)
        s, k, z, t = r["memory"], r["kept_alive"], r["zygote"], times[r["shim"]]
        lines.append(
            f"| {r['shim']} | {s['rss']:.1f} MiB | {s['pss']:.1f} MiB | {s['private']:.1f} MiB"
            f" | {k['pss']:.1f} MiB | {_mib(z['pss'])} | {per_container(r):.1f} MiB"
            f" | {t['median']:.0f} ms ({t['min']:.0f}) "
            f"| {per_container(r) / per_container(go):.2f}x "
            f"| {t['median'] / times[go['shim']]['median']:.2f}x |"
        )
    return "\n".join(lines)


def report_grouped(results: list[dict[str, Any]]) -> str:
    lines = [
        "| shim (all containers in one group) | shims | shim PSS | shim private | zygote PSS "
        "| per container PSS | vs Go |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        go = _reference(results, r)
        s, z = r["memory"], r["zygote"]
        lines.append(
            f"| {r['shim']} | {r['shims']} | {s['pss']:.1f} MiB | {s['private']:.1f} MiB"
            f" | {_mib(z['pss'])} | {per_container(r):.2f} MiB"
            f" | {per_container(r) / per_container(go):.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-v1", action="store_true", help="only the runtime v2 shims")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/shim.py needs root", file=sys.stderr)
        return 1
    base = f"bench-{os.getpid()}"
    cds = [Containerd.create(namespace=base)]
    if not args.no_v1:
        cds.append(Containerd.create(namespace=f"{base}-v1go", v1_shim=GO_V1_SHIM))
        cds.append(Containerd.create(namespace=f"{base}-v1py", v1_shim="pyrunc"))
    try:
        rootfs = build_rootfs(cds[0].tmp / "rootfs")
        for cd in cds:
            cd.start()
        shims = [
            Shim("io.containerd.runc.v2 (Go)", cds[0], "io.containerd.runc.v2", v2_shim_pid, True),
            Shim("io.containerd.pyrunc.v2 (ours)", cds[0], "io.containerd.pyrunc.v2",
                 v2_shim_pid, False),
        ]  # fmt: skip
        if not args.no_v1:
            shims += [
                Shim("v1 containerd-shim (Go)", cds[1], V1_RUNTIME, v1_shim_pid, True),
                Shim("v1 containerd-shim-pyrunc-v1 (ours)", cds[2], V1_RUNTIME, v1_shim_pid,
                     False),
            ]  # fmt: skip
        results, grouped = [], []
        for shim in shims:
            print(f"measuring {shim.label} ...", file=sys.stderr)
            results.append(measure_memory(shim, rootfs, args.containers))
            if shim.runtime != V1_RUNTIME:  # v1 has no shim groups
                grouped.append(measure_memory(shim, rootfs, args.containers, grouped=True))
        print("timing ctr run --rm ...", file=sys.stderr)
        times = measure_times(shims, rootfs, args.runs)
    finally:
        for cd in cds:
            cd.cleanup()
    version = subprocess.run([shim_python(), "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    print(f"{args.containers} containers running per shim, {args.runs} timed runs each; "
          f"our shims on Python {version} ({shim_python()})\n")  # fmt: skip
    print(report(results, times))
    print(f"\nShim grouping: {args.containers} containers sharing one shim\n")
    print(report_grouped(grouped))
    if args.json:
        data = {"one_shim_each": results, "grouped": grouped, "run_rm_ms": times}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
