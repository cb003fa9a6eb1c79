"""containerd_shim.cgroups: parsing (fixture files) and, as root on cgroup v1, real cgroups."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from containerd_shim import cgroupfs
from containerd_shim import cgroups as cg
from containerd_shim.api.cgroups.stats.v1 import metrics_pb2 as v1pb
from containerd_shim.api.cgroups.v2.stats import metrics_pb2 as v2pb
from ttrpc import Code, RpcError

MAX64 = (1 << 64) - 1
WAIT = 30.0  # upper bound for any wait on the kernel or a child; never a sleep

# --------------------------------------------------------------------------- fixtures: files

MOUNTINFO_HYBRID = """\
22 1 254:1 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:32 / /mnt/memory\\040again rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""

MOUNTINFO_V2 = """\
22 1 254:1 / / rw,relatime - ext4 /dev/vda rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw
"""

MEMORY_STAT_V1 = """\
cache 4096
rss 8192
rss_huge 2097152
shmem 0
mapped_file 12
dirty 13
writeback 14
pgpgin 15
pgpgout 16
pgfault 17
pgmajfault 18
inactive_anon 19
active_anon 20
inactive_file 21
active_file 22
unevictable 23
hierarchical_memory_limit 9223372036854771712
hierarchical_memsw_limit 9223372036854771712
total_cache 104096
total_rss 108192
total_rss_huge 102097152
total_mapped_file 112
total_dirty 113
total_writeback 114
total_pgpgin 115
total_pgpgout 116
total_pgfault 117
total_pgmajfault 118
total_inactive_anon 119
total_active_anon 120
total_inactive_file 121
total_active_file 122
total_unevictable 123
"""

MEMORY_STAT_V2 = """\
anon 1000
file 2000
kernel 77
kernel_stack 3000
pagetables 1
slab 4000
sock 5000
shmem 6000
file_mapped 7000
file_dirty 8000
file_writeback 9000
anon_thp 10000
inactive_anon 11
active_anon 12
inactive_file 13
active_file 14
unevictable 15
slab_reclaimable 16
slab_unreclaimable 17
pgfault 18
pgmajfault 19
workingset_refault 20
workingset_activate 21
workingset_nodereclaim 22
pgrefill 23
pgscan 24
pgsteal 25
pgactivate 26
pgdeactivate 27
pglazyfree 28
pglazyfreed 29
thp_fault_alloc 30
thp_collapse_alloc 31
"""

CPU_STAT_V2 = """\
usage_usec 123456
user_usec 100000
system_usec 23456
core_sched.force_idle_usec 0
nr_periods 7
nr_throttled 3
throttled_usec 999
nr_bursts 0
burst_usec 0
"""

IO_STAT_V2 = """\
8:0 rbytes=1048576 wbytes=2097152 rios=10 wios=20 dbytes=0 dios=0
253:1 rbytes=5 wbytes=6 rios=7 wios=8
garbage line
"""


def expect(msg: object, **fields: int) -> None:
    assert {k: getattr(msg, k) for k in fields} == fields


def write_files(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


# --------------------------------------------------------------------------- parsing tests


def test_parse_mountinfo_hybrid() -> None:
    mounts = cg.parse_mountinfo(MOUNTINFO_HYBRID)
    assert [m.mountpoint for m in mounts] == [
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup/memory",
        "/mnt/memory again",
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup/unified",
    ]
    assert mounts[0].has("cpu") and mounts[0].has("cpuacct") and mounts[0].version == 1
    assert mounts[3].has("name=systemd")
    assert mounts[4].version == 2
    assert cgroupfs.is_v1(mounts)
    # One per hierarchy: the bind mount of the memory hierarchy and the v2 mount are skipped.
    assert [m.mountpoint for m in cgroupfs.v1_hierarchies(mounts)] == [
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/systemd",
    ]


def test_parse_mountinfo_pure_v2() -> None:
    mounts = cg.parse_mountinfo(MOUNTINFO_V2)
    assert mounts == [cg.Mount("/sys/fs/cgroup", "/", 2, frozenset(), "0:26")]
    assert not cgroupfs.is_v1(mounts)
    # Only a named v1 hierarchy (no controllers) is not "v1" either.
    named = cg.Mount("/sys/fs/cgroup/systemd", "/", 1, frozenset({"rw", "name=systemd"}))
    assert not cgroupfs.is_v1([named, *mounts])


def test_parse_proc_cgroup() -> None:
    v1, unified = cg.parse_proc_cgroup(
        "9:name=systemd:/\n4:memory:/default/ctr1\n1:cpu,cpuacct:/default/ctr1\n0::/x\n"
    )
    assert v1 == {
        "name=systemd": "/",
        "memory": "/default/ctr1",
        "cpu": "/default/ctr1",
        "cpuacct": "/default/ctr1",
    }
    assert unified == "/x"
    assert cg.parse_proc_cgroup("0::/a/b (deleted)\n") == ({}, "/a/b")


def test_under_strips_mount_root() -> None:
    m = cg.Mount("/sys/fs/cgroup/memory", "/outer", 1, frozenset({"memory"}))
    assert cgroupfs.under(m, "/outer/ctr") == "/sys/fs/cgroup/memory/ctr"
    assert cgroupfs.under(m, "/outer") == "/sys/fs/cgroup/memory/"
    root = cg.Mount("/sys/fs/cgroup", "/", 2)
    assert cgroupfs.under(root, "/a/b") == "/sys/fs/cgroup/a/b"


def test_parse_blkio_and_io_stat() -> None:
    text = "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 1\n8:16 300\nTotal 12289\n"
    assert cg.parse_blkio(text) == [
        (8, 0, "Read", 4096),
        (8, 0, "Write", 8192),
        (8, 0, "Sync", 1),
        (8, 16, "", 300),
    ]
    first = {"rbytes": 1048576, "wbytes": 2097152, "rios": 10, "wios": 20, "dbytes": 0, "dios": 0}
    assert cg.parse_io_stat(IO_STAT_V2) == [
        (8, 0, first),
        (253, 1, {"rbytes": 5, "wbytes": 6, "rios": 7, "wios": 8}),
    ]


def test_v1_metrics_from_files(tmp_path: Path) -> None:
    proc = write_files(
        tmp_path / "proc",
        {"partitions": "major minor  #blocks  name\n\n   8        0  1000 sda\n 8 16 5 sdb\n"},
    )
    mem = write_files(
        tmp_path / "memory",
        {
            "memory.stat": MEMORY_STAT_V1,
            "memory.usage_in_bytes": "1000\n",
            "memory.max_usage_in_bytes": "2000\n",
            "memory.failcnt": "3\n",
            "memory.limit_in_bytes": "8388608\n",
            "memory.memsw.usage_in_bytes": "1100\n",
            "memory.memsw.limit_in_bytes": "-1\n",  # negative reads as 0, like Go
            "memory.kmem.usage_in_bytes": "50\n",
            "memory.oom_control": "oom_kill_disable 1\nunder_oom 0\noom_kill 4\n",
        },
    )
    cpuacct = write_files(
        tmp_path / "cpuacct",
        {
            "cpuacct.usage": "5000000000\n",
            "cpuacct.stat": "user 300\nsystem 100\n",
            "cpuacct.usage_percpu": "3000000000 2000000000 \n",
        },
    )
    cpu = write_files(
        tmp_path / "cpu",
        {"cpu.stat": "nr_periods 10\nnr_throttled 2\nthrottled_time 777\nnr_bursts 0\n"},
    )
    pids = write_files(tmp_path / "pids", {"pids.current": "3\n", "pids.max": "max\n"})
    blkio = write_files(
        tmp_path / "blkio",
        {
            # No CFQ files: the throttle.* files are used, as Go does.
            "blkio.throttle.io_serviced": "8:0 Read 1\n8:0 Write 2\nTotal 3\n",
            "blkio.throttle.io_service_bytes": "8:16 Read 4096\n9:9 Write 1\nTotal 4097\n",
        },
    )
    hugetlb = write_files(
        tmp_path / "hugetlb",
        {
            "hugetlb.2MB.usage_in_bytes": "2097152\n",
            "hugetlb.2MB.max_usage_in_bytes": "4194304\n",
            "hugetlb.2MB.failcnt": "1\n",
            "hugetlb.2MB.limit_in_bytes": "9223372036854771712\n",
            "hugetlb.1GB.usage_in_bytes": "0\n",
            "hugetlb.2MB.rsvd.usage_in_bytes": "0\n",
        },
    )
    rdma = write_files(
        tmp_path / "rdma",
        {
            "rdma.current": "mlx4_0 hca_handle=2 hca_object=2000\n",
            "rdma.max": "mlx4_0 hca_handle=max hca_object=10\n",
        },
    )
    m = cg.v1_metrics(
        {
            "memory": str(mem),
            "cpuacct": str(cpuacct),
            "cpu": str(cpu),
            "pids": str(pids),
            "blkio": str(blkio),
            "hugetlb": str(hugetlb),
            "rdma": str(rdma),
        },
        proc_root=str(proc),
        sys_root=str(tmp_path / "nosys"),
    )
    mm = m.memory
    expect(mm, cache=4096, rss=8192, rss_huge=2097152, mapped_file=12, dirty=13, writeback=14)
    expect(mm, pg_pg_in=15, pg_pg_out=16, pg_fault=17, pg_maj_fault=18, unevictable=23)
    expect(mm, inactive_anon=19, active_anon=20, inactive_file=21, active_file=22)
    expect(mm, hierarchical_memory_limit=9223372036854771712)
    expect(mm, hierarchical_swap_limit=9223372036854771712)
    expect(mm, total_cache=104096, total_rss=108192, total_rss_huge=102097152)
    expect(mm, total_mapped_file=112, total_dirty=113, total_writeback=114)
    expect(mm, total_pg_pg_in=115, total_pg_pg_out=116, total_pg_fault=117)
    expect(mm, total_pg_maj_fault=118, total_inactive_anon=119, total_active_anon=120)
    expect(mm, total_inactive_file=121, total_active_file=122, total_unevictable=123)
    expect(mm.usage, usage=1000, max=2000, failcnt=3, limit=8388608)
    expect(mm.swap, usage=1100, limit=0)
    expect(mm.kernel, usage=50)
    assert mm.HasField("kernel_tcp")  # present (empty), as in Go
    oom = m.memory_oom_control
    assert (oom.oom_kill_disable, oom.under_oom, oom.oom_kill) == (1, 0, 4)

    ticks = os.sysconf("SC_CLK_TCK")
    u = m.cpu.usage
    assert u.total == 5_000_000_000
    assert u.user == 300 * 1_000_000_000 // ticks
    assert u.kernel == 100 * 1_000_000_000 // ticks
    assert list(u.per_cpu) == [3_000_000_000, 2_000_000_000]
    t = m.cpu.throttling
    assert (t.periods, t.throttled_periods, t.throttled_time) == (10, 2, 777)

    assert (m.pids.current, m.pids.limit) == (3, 0)  # v1: "max" is 0

    serviced = [(e.device, e.major, e.minor, e.op, e.value) for e in m.blkio.io_serviced_recursive]
    assert serviced == [("/dev/sda", 8, 0, "Read", 1), ("/dev/sda", 8, 0, "Write", 2)]
    sbytes = [(e.device, e.op, e.value) for e in m.blkio.io_service_bytes_recursive]
    assert sbytes == [("/dev/sdb", "Read", 4096), ("", "Write", 1)]

    assert [(h.pagesize, h.usage, h.max, h.failcnt) for h in m.hugetlb] == [
        ("2MB", 2097152, 4194304, 1),
        ("1GB", 0, 0, 0),
    ]
    assert [(e.device, e.hca_handles, e.hca_objects) for e in m.rdma.current] == [
        ("mlx4_0", 2, 2000)
    ]
    assert [(e.device, e.hca_handles, e.hca_objects) for e in m.rdma.limit] == [
        ("mlx4_0", (1 << 32) - 1, 10)
    ]


def test_v1_metrics_cfq_blkio_and_missing_files(tmp_path: Path) -> None:
    proc = write_files(tmp_path / "proc", {"partitions": "major minor #blocks name\n\n8 0 1 sda\n"})
    blkio = write_files(
        tmp_path / "blkio",
        {
            "blkio.io_serviced_recursive": "8:0 Read 5\n8:0 Write 6\nTotal 11\n",
            "blkio.time_recursive": "8:0 42\n",
            "blkio.throttle.io_serviced": "8:0 Read 99\n",
        },
    )
    empty_mem = write_files(tmp_path / "memory", {})
    m = cg.v1_metrics(
        {"blkio": str(blkio), "memory": str(empty_mem), "pids": str(tmp_path / "gone")},
        proc_root=str(proc),
    )
    assert [(e.op, e.value) for e in m.blkio.io_serviced_recursive] == [("Read", 5), ("Write", 6)]
    assert [(e.device, e.op, e.value) for e in m.blkio.io_time_recursive] == [("/dev/sda", "", 42)]
    # Missing controllers/files are skipped; cpu is always there (as in Go).
    assert not m.HasField("memory") and not m.HasField("pids")
    assert m.HasField("cpu") and m.cpu.HasField("usage") and m.cpu.HasField("throttling")


def v2_files(directory: Path) -> Path:
    return write_files(
        directory,
        {
            "cgroup.procs": "",
            "memory.stat": MEMORY_STAT_V2,
            "cpu.stat": CPU_STAT_V2,
            "io.stat": IO_STAT_V2,
            "memory.current": "123456\n",
            "memory.max": "max\n",
            "memory.swap.current": "7\n",
            "memory.swap.max": "1048576\n",
            "memory.events": "low 1\nhigh 2\nmax 3\noom 4\noom_kill 5\n",
            "pids.current": "4\n",
            "pids.max": "max\n",
            "hugetlb.2MB.current": "2097152\n",
            "hugetlb.2MB.max": "max\n",
            "hugetlb.2MB.rsvd.max": "max\n",
            "hugetlb.1GB.current": "0\n",
            "hugetlb.1GB.max": "1073741824\n",
            "rdma.current": "mlx5_1 hca_handle=3 hca_object=4\n",
            "rdma.max": "mlx5_1 hca_handle=max hca_object=max\n",
        },
    )


def test_v2_metrics_from_files(tmp_path: Path) -> None:
    m = cg.v2_metrics(str(v2_files(tmp_path)))
    assert (m.pids.current, m.pids.limit) == (4, MAX64)  # v2 (Go): "max" is MaxUint64
    c = m.cpu
    assert (c.usage_usec, c.user_usec, c.system_usec) == (123456, 100000, 23456)
    assert (c.nr_periods, c.nr_throttled, c.throttled_usec) == (7, 3, 999)
    mem = m.memory
    expect(mem, anon=1000, file=2000, kernel_stack=3000, slab=4000, sock=5000, shmem=6000)
    expect(mem, file_mapped=7000, file_dirty=8000, file_writeback=9000, anon_thp=10000)
    expect(mem, inactive_anon=11, active_anon=12, inactive_file=13, active_file=14)
    expect(mem, unevictable=15, slab_reclaimable=16, slab_unreclaimable=17)
    expect(mem, pgfault=18, pgmajfault=19, workingset_refault=20, workingset_activate=21)
    expect(mem, workingset_nodereclaim=22, pgrefill=23, pgscan=24, pgsteal=25)
    expect(mem, pgactivate=26, pgdeactivate=27, pglazyfree=28, pglazyfreed=29)
    expect(mem, thp_fault_alloc=30, thp_collapse_alloc=31)
    expect(mem, usage=123456, usage_limit=MAX64, swap_usage=7, swap_limit=1048576)
    ev = m.memory_events
    assert (ev.low, ev.high, ev.max, ev.oom, ev.oom_kill) == (1, 2, 3, 4, 5)
    assert [(e.major, e.minor, e.rbytes, e.wbytes, e.rios, e.wios) for e in m.io.usage] == [
        (8, 0, 1048576, 2097152, 10, 20),
        (253, 1, 5, 6, 7, 8),
    ]
    assert [(h.pagesize, h.current, h.max) for h in m.hugetlb] == [
        ("2MB", 2097152, MAX64),
        ("1GB", 0, 1073741824),
    ]
    assert [(e.device, e.hca_handles, e.hca_objects) for e in m.rdma.current] == [("mlx5_1", 3, 4)]
    assert [(e.hca_handles, e.hca_objects) for e in m.rdma.limit] == [((1 << 32) - 1,) * 2]


def test_v2_metrics_empty_dir(tmp_path: Path) -> None:
    m = cg.v2_metrics(str(tmp_path))
    assert m.pids.current == 0 and m.memory.usage == 0 and not m.HasField("memory_events")
    assert list(m.io.usage) == [] and list(m.hugetlb) == []


def fake_proc(tmp_path: Path, pid: int, text: str) -> Path:
    proc = tmp_path / "proc"
    write_files(proc / str(pid), {"cgroup": text})
    return proc


def test_stats_on_pure_v2_host(tmp_path: Path) -> None:
    v2_files(tmp_path / "cg" / "default" / "ctr1")
    proc = fake_proc(tmp_path, 4242, "0::/default/ctr1\n")
    mounts = [cg.Mount(str(tmp_path / "cg"), "/", 2)]
    with cg.Cgroups(proc_root=str(proc), mounts=mounts) as c:
        a = c.stats("ctr1", 4242)
        assert a.type_url == "io.containerd.cgroups.v2.Metrics"
        m = v2pb.Metrics()
        m.ParseFromString(a.value)
        assert m.cpu.usage_usec == 123456 and m.memory_events.oom_kill == 5
        with pytest.raises(RpcError) as ei:
            c.stats("ctr2", 4343)  # no such process
        assert ei.value.code == Code.NOT_FOUND


def test_stats_on_v1_host_from_fake_files(tmp_path: Path) -> None:
    write_files(tmp_path / "memory" / "ctr1", {"memory.stat": MEMORY_STAT_V1})
    write_files(tmp_path / "pids" / "ctr1", {"pids.current": "2\n", "pids.max": "100\n"})
    proc = fake_proc(tmp_path, 77, "5:pids:/ctr1\n4:memory:/ctr1\n0::/\n")
    mounts = [
        cg.Mount(str(tmp_path / "memory"), "/", 1, frozenset({"rw", "memory"})),
        cg.Mount(str(tmp_path / "pids"), "/", 1, frozenset({"rw", "pids"})),
        cg.Mount(str(tmp_path / "unified"), "/", 2),  # hybrid: v1 wins
    ]
    c = cg.Cgroups(proc_root=str(proc), mounts=mounts)
    a = c.stats("ctr1", 77)
    assert a.type_url == "io.containerd.cgroups.v1.Metrics"
    m = v1pb.Metrics()
    m.ParseFromString(a.value)
    assert m.memory.rss == 8192 and (m.pids.current, m.pids.limit) == (2, 100)
    # The cgroup is remembered for the container: it is found again by the same pid even
    # after the process is gone, until the cgroup itself is removed.
    (proc / "77" / "cgroup").unlink()
    assert c.stats("ctr1", 77).type_url == "io.containerd.cgroups.v1.Metrics"
    for d in ("memory", "pids"):
        for f in (tmp_path / d / "ctr1").iterdir():
            f.unlink()
        (tmp_path / d / "ctr1").rmdir()
    with pytest.raises(RpcError) as ei:
        c.stats("ctr1", 77)
    assert ei.value.code == Code.NOT_FOUND
    c.forget("ctr1")
    c.forget("ctr1")  # idempotent
    c.close()
    c.close()


def test_watch_missing_cgroup_is_best_effort(tmp_path: Path) -> None:
    c = cg.Cgroups(proc_root=str(tmp_path), mounts=[cg.Mount(str(tmp_path), "/", 2)])
    c.watch("nope", 123456, lambda _id: None)  # logs, does not raise
    assert c._thread is None
    c.close()


def test_add_process_to_cgroup_v2_fake(tmp_path: Path) -> None:
    write_files(tmp_path / "cg" / "shim" / "grp", {"cgroup.procs": ""})
    cg.add_process_to_cgroup("/shim/grp", 4321, mounts=[cg.Mount(str(tmp_path / "cg"), "/", 2)])
    assert (tmp_path / "cg" / "shim" / "grp" / "cgroup.procs").read_text() == "4321"
    with pytest.raises(ValueError):
        cg.add_process_to_cgroup("/x", 0, mounts=[])
    with pytest.raises(OSError):
        cg.add_process_to_cgroup("/x", 1, mounts=[])


# --------------------------------------------------------------------------- real cgroups (root)

try:
    HOST_MOUNTS = cg.read_mounts()
except OSError:
    HOST_MOUNTS = []


def host_mount(controller: str) -> cg.Mount | None:
    for m in HOST_MOUNTS:
        if m.version == 1 and m.has(controller) and m.root == "/":
            return m
    return None


def host_v2_mount() -> cg.Mount | None:
    for m in HOST_MOUNTS:
        if m.version == 2 and m.root == "/":
            return m
    return None


MEMORY_MOUNT = host_mount("memory")
needs_v1 = pytest.mark.skipif(
    os.geteuid() != 0
    or MEMORY_MOUNT is None
    or not os.path.exists(os.path.join(MEMORY_MOUNT.mountpoint, "cgroup.event_control")),
    reason="needs root and a cgroup v1 memory hierarchy",
)
V2_MOUNT = host_v2_mount()
needs_v2_mount = pytest.mark.skipif(
    os.geteuid() != 0
    or V2_MOUNT is None
    or not os.path.exists(os.path.join(V2_MOUNT.mountpoint, "cgroup.procs")),
    reason="needs root and a cgroup2 mount",
)

_names = itertools.count()


def unique(tag: str) -> str:
    return f"pyshim-test-{os.getpid()}-{tag}-{next(_names)}"


def own_cgroup(mount: cg.Mount) -> str:
    """This process's cgroup directory in ``mount``'s hierarchy."""
    v1, unified = cg.parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    if mount.version == 2:
        return cgroupfs.under(mount, unified or "/")
    for name in mount.options:
        if name in v1:
            return cgroupfs.under(mount, v1[name])
    return mount.mountpoint


def remove_cgroup(mount: cg.Mount, directory: str) -> None:
    """Move any process left in ``directory`` (and below) back to ours, then rmdir."""
    if not os.path.isdir(directory):
        return
    for sub in sorted((p for p in Path(directory).rglob("*") if p.is_dir()), reverse=True):
        remove_cgroup(mount, str(sub))
    home = os.path.join(own_cgroup(mount), "cgroup.procs")
    for pid in Path(directory, "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):  # it may have exited meanwhile
            Path(home).write_text(pid)
    os.rmdir(directory)


CHILD = r"""
import sys
keep = []
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "alloc":
        keep.append(b"x" * (8 << 20))
    elif cmd == "oom":
        keep.append(b"x" * (256 << 20))
    print("ok", cmd, flush=True)
"""


class Child:
    """A python child process driven over pipes: each command line is answered with 'ok'."""

    def __init__(self) -> None:
        in_r, self._in = os.pipe()
        self._out, out_w = os.pipe()
        try:
            self.pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-c", CHILD],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, in_r, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                ],
            )
        finally:
            os.close(in_r)
            os.close(out_w)
        self.status: int | None = None

    def command(self, cmd: str) -> str:
        """Send a command; return the reply line ('' if the child died)."""
        try:
            os.write(self._in, cmd.encode() + b"\n")
        except BrokenPipeError:
            return ""
        buf = b""
        while not buf.endswith(b"\n"):
            ready, _, _ = select.select([self._out], [], [], WAIT)
            assert ready, f"child did not answer {cmd!r} within {WAIT}s"
            chunk = os.read(self._out, 4096)
            if not chunk:
                return ""
            buf += chunk
        return buf.decode().strip()

    def wait(self) -> int:
        if self.status is None:
            self.status = os.waitpid(self.pid, 0)[1]
        return self.status

    def close(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait()
        for fd in (self._in, self._out):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def spawn() -> Iterator[Callable[[], Child]]:
    children: list[Child] = []

    def make() -> Child:
        c = Child()
        children.append(c)
        return c

    yield make
    for c in children:
        c.close()


@pytest.fixture
def v1_cgroup() -> Iterator[dict[str, str]]:
    """A fresh cgroup in the memory, cpu, cpuacct, pids and blkio v1 hierarchies."""
    name = unique("v1")
    made: list[tuple[cg.Mount, str]] = []
    dirs: dict[str, str] = {}
    try:
        for controller in ("memory", "cpu", "cpuacct", "pids", "blkio"):
            m = host_mount(controller)
            if m is None:
                continue
            d = os.path.join(m.mountpoint, name)
            if not os.path.isdir(d):
                os.mkdir(d)
                made.append((m, d))
            dirs[controller] = d
        yield dirs
    finally:
        for m, d in made:
            remove_cgroup(m, d)


def join(dirs: dict[str, str], pid: int) -> None:
    for d in dirs.values():
        Path(d, "cgroup.procs").write_text(str(pid))


@needs_v1
def test_v1_stats_real_cgroup(v1_cgroup: dict[str, str], spawn: Callable[[], Child]) -> None:
    child = spawn()
    assert child.command("hello") == "ok hello"
    join(v1_cgroup, child.pid)
    assert child.command("alloc") == "ok alloc"  # charged to the new memory cgroup
    with cg.Cgroups() as c:
        a = c.stats("ctr-v1", child.pid)
        assert a.type_url == "io.containerd.cgroups.v1.Metrics"
        m = v1pb.Metrics()
        m.ParseFromString(a.value)
        assert m.memory.usage.usage > 0
        assert m.memory.total_rss + m.memory.total_cache > 0
        assert m.HasField("memory_oom_control")
        if "pids" in v1_cgroup:
            assert m.pids.current >= 1
        if "cpuacct" in v1_cgroup:
            assert m.cpu.usage.total > 0
            assert len(m.cpu.usage.per_cpu) >= 1
        if "blkio" in v1_cgroup:
            assert m.HasField("blkio")

        child.close()  # killed and reaped: /proc/<pid> is gone
        with pytest.raises(RpcError) as ei:
            c.stats("ctr-dead", child.pid)
        assert ei.value.code == Code.NOT_FOUND


@needs_v1
def test_v1_oom_event(v1_cgroup: dict[str, str], spawn: Callable[[], Child]) -> None:
    mem = v1_cgroup["memory"]
    limit = str(8 << 20)
    Path(mem, "memory.limit_in_bytes").write_text(limit)
    memsw = Path(mem, "memory.memsw.limit_in_bytes")
    if memsw.exists():  # swap accounting: no escape into swap
        memsw.write_text(limit)
    child = spawn()
    assert child.command("hello") == "ok hello"
    join({"memory": mem}, child.pid)

    fired = threading.Event()
    calls: list[str] = []

    def on_oom(container_id: str) -> None:
        calls.append(container_id)
        fired.set()

    with cg.Cgroups() as c:
        c.watch("ctr-oom", child.pid, on_oom)
        assert c._thread is not None and c._thread.is_alive()
        assert child.command("oom") == ""  # the child dies allocating 256 MiB
        status = child.wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert fired.wait(WAIT), "on_oom was not called"
        assert calls and set(calls) == {"ctr-oom"}
        oom = v1pb.Metrics()
        oom.ParseFromString(c.stats("ctr-oom", child.pid).value)  # remembered from watch()
        # oom_kill is in memory.oom_control since Linux 4.13; failcnt counts hitting the limit.
        hits = oom.memory.usage.failcnt + oom.memory.swap.failcnt
        assert oom.memory_oom_control.oom_kill >= 1 or hits > 0
        c.forget("ctr-oom")
        assert not c._watches
        c.forget("ctr-oom")
        thread = c._thread
    assert not thread.is_alive()  # close() stopped the thread


@needs_v1
def test_v1_watch_two_containers_one_thread(spawn: Callable[[], Child]) -> None:
    assert MEMORY_MOUNT is not None
    made = []
    try:
        with cg.Cgroups() as c:
            for i in range(2):
                d = os.path.join(MEMORY_MOUNT.mountpoint, unique("two"))
                os.mkdir(d)
                made.append(d)
                child = spawn()
                join({"memory": d}, child.pid)
                c.watch(f"ctr{i}", child.pid, lambda _id: None)
            assert len(c._watches) == 2
            assert sum(t.name == "cgroups-oom" for t in threading.enumerate()) >= 1
            first = c._thread
            c.watch("ctr0", child.pid, lambda _id: None)  # re-watch replaces
            assert len(c._watches) == 2 and c._thread is first
    finally:
        for d in made:
            remove_cgroup(MEMORY_MOUNT, d)


@needs_v2_mount
def test_v2_watch_via_kernfs_poll(spawn: Callable[[], Child]) -> None:
    """The v2 watcher on a real cgroup2 file (kernfs POLLPRI).

    On a hybrid host memory.events is not there, so the watcher is pointed at
    cgroup.events / "frozen", which the kernel notifies the same way.
    """
    assert V2_MOUNT is not None
    d = os.path.join(V2_MOUNT.mountpoint, unique("v2"))
    os.mkdir(d)
    try:
        if not os.path.exists(os.path.join(d, "cgroup.freeze")):
            pytest.skip("no cgroup.freeze")
        child = spawn()
        assert child.command("hello") == "ok hello"
        Path(d, "cgroup.procs").write_text(str(child.pid))
        fired = threading.Event()
        with cg.Cgroups(mounts=[V2_MOUNT]) as c:
            c.v2_events_file, c.v2_events_key = "cgroup.events", "frozen"
            c.watch("ctr-v2", child.pid, lambda cid: fired.set() if cid == "ctr-v2" else None)
            assert len(c._watches) == 1
            a = c.stats("ctr-v2", child.pid)
            assert a.type_url == "io.containerd.cgroups.v2.Metrics"
            m = v2pb.Metrics()
            m.ParseFromString(a.value)
            assert m.HasField("cpu")
            Path(d, "cgroup.freeze").write_text("1")
            assert fired.wait(WAIT), "no notification for the cgroup.events change"
            Path(d, "cgroup.freeze").write_text("0")
        child.close()
    finally:
        with contextlib.suppress(OSError):
            Path(d, "cgroup.freeze").write_text("0")
        remove_cgroup(V2_MOUNT, d)


@needs_v1
def test_add_process_to_cgroup_real(spawn: Callable[[], Child]) -> None:
    top = unique("add")
    child = spawn()
    assert child.command("hello") == "ok hello"
    hierarchies = cgroupfs.v1_hierarchies(HOST_MOUNTS)
    try:
        cg.add_process_to_cgroup(f"/{top}/shim", child.pid)
        v1, _ = cg.parse_proc_cgroup(Path(f"/proc/{child.pid}/cgroup").read_text())
        for m in hierarchies:
            names = [n for n in m.options if n in v1]
            assert names, m
            assert v1[names[0]] == f"/{top}/shim", (m, v1)
        # Again (directories exist now): still fine.
        cg.add_process_to_cgroup(f"/{top}/shim", child.pid)
    finally:
        child.close()
        for m in hierarchies:
            with contextlib.suppress(OSError):
                remove_cgroup(m, os.path.join(m.mountpoint, top))


def test_read_errors_other_than_missing_propagate(tmp_path: Path) -> None:
    assert cgroupfs.read_text(str(tmp_path / "missing")) is None
    with pytest.raises(OSError) as ei:
        cgroupfs.read_text(str(tmp_path))  # a directory
    assert ei.value.errno == errno.EISDIR
