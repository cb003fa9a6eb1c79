"""Cgroup metrics and OOM watching for the containers of one shim.

What containerd's runc shim does with github.com/containerd/cgroups, for
cgroup v1 (including "hybrid" hosts, where v1 controllers are mounted next to
a cgroup2 mount) and for pure cgroup v2 hosts:

* :meth:`Cgroups.stats` reads a container's cgroup files into an
  ``io.containerd.cgroups.v1.Metrics`` or ``io.containerd.cgroups.v2.Metrics``
  packed in an ``Any`` whose ``type_url`` is the bare message name, as
  containerd's ``typeurl.MarshalAny`` produces it.
* :meth:`Cgroups.watch` reports OOM kills: on v1 through an eventfd registered
  with ``cgroup.event_control`` for ``memory.oom_control``; on v2 by polling
  ``memory.events`` (kernfs signals changes as ``POLLPRI``) and comparing the
  ``oom_kill`` counter. One epoll thread serves every container of the shim.
* :func:`add_process_to_cgroup` joins the shim to the ``shim_cgroup`` of the
  runc options.

Cgroup mounts come from ``/proc/self/mountinfo``; the ``proc_root`` and
``mounts`` arguments let tests point the readers at other files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from containerd_shim.cgroupfs import (
    Mount,
    add_process_to_cgroup,
    is_v1,
    parse_mountinfo,
    parse_proc_cgroup,
    read_mounts,
    read_text,
    under,
)
from ttrpc import Code, RpcError

if TYPE_CHECKING:
    from google.protobuf.any_pb2 import Any as AnyPb
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
    from google.protobuf.message import Message

    from containerd_shim.api.cgroups.stats.v1 import metrics_pb2 as v1pb
    from containerd_shim.api.cgroups.v2.stats import metrics_pb2 as v2pb

__all__ = [
    "Cgroups",
    "Mount",
    "add_process_to_cgroup",
    "parse_blkio",
    "parse_io_stat",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "read_mounts",
    "v1_metrics",
    "v2_metrics",
]

log = logging.getLogger("containerd_shim")

_MAX_UINT64 = (1 << 64) - 1
_MAX_UINT32 = (1 << 32) - 1
_NS_PER_SEC = 1_000_000_000

# The v1 controllers that contribute to Metrics.
_V1_STAT_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio", "hugetlb", "rdma")


# --------------------------------------------------------------------------- parsing helpers


def _parse_uint(s: str) -> int | None:
    """Go's parseUint: negative numbers count as 0; unparsable or too large gives None."""
    try:
        v = int(s, 10)
    except ValueError:
        return None
    if v < 0:
        return 0
    return v if v <= _MAX_UINT64 else None


def _read_uint(path: str) -> int | None:
    data = read_text(path)
    return None if data is None else _parse_uint(data.strip())


def _parse_kv(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, ...); malformed lines are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        v = _parse_uint(parts[1])
        if v is not None:
            out[parts[0]] = v
    return out


def _read_kv(path: str) -> dict[str, int] | None:
    data = read_text(path)
    return None if data is None else _parse_kv(data)


def _read_uint_or_max(path: str) -> int:
    """v2 single-value file: ``max`` is MaxUint64, missing or garbage is 0."""
    data = read_text(path)
    if data is None:
        return 0
    s = data.strip()
    if s == "max":
        return _MAX_UINT64
    return _parse_uint(s) or 0


_SIZE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def _pagesize_key(size: str) -> tuple[int, float, str]:
    """Sort key for page-size names such as ``2MB`` / ``1GB``."""
    for i in range(len(_SIZE_UNITS) - 1, -1, -1):
        unit = _SIZE_UNITS[i]
        if size.endswith(unit):
            try:
                return (i, float(size[: -len(unit)]), size)
            except ValueError:
                break
    return (len(_SIZE_UNITS), 0.0, size)


def _hugetlb_sizes(directory: str, suffix: str) -> list[str]:
    """Page sizes with a ``hugetlb.<size>.<suffix>`` file in ``directory``."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    sizes = []
    for name in names:
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "hugetlb" and parts[2] == suffix:
            sizes.append(parts[1])
    sizes.sort(key=_pagesize_key)
    return sizes


def _rdma_entries(lines: Iterable[str]) -> list[tuple[str, int, int]]:
    """``mlx4_0 hca_handle=2 hca_object=2000`` lines as (device, handles, objects)."""
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue
        values = {"hca_handle": 0, "hca_object": 0}
        for kv in parts[1:]:
            key, sep, raw = kv.partition("=")
            if not sep or key not in values:
                continue
            if raw == "max":
                values[key] = _MAX_UINT32
            else:
                v = _parse_uint(raw)
                if v is not None and v <= _MAX_UINT32:
                    values[key] = v
        out.append((parts[0], values["hca_handle"], values["hca_object"]))
    return out


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK") or 100
    except (OSError, ValueError):
        return 100


# --------------------------------------------------------------------------- block devices


class _Devices:
    """Block device names by (major, minor): /proc/partitions first, /sys/dev/block second."""

    def __init__(self, proc_root: str, sys_root: str) -> None:
        self._proc_root = proc_root
        self._sys_root = sys_root
        self._names: dict[tuple[int, int], str] | None = None

    def name(self, major: int, minor: int) -> str:
        if self._names is None:
            self._names = {}
            data = read_text(os.path.join(self._proc_root, "partitions")) or ""
            for line in data.splitlines()[2:]:
                fields = line.split()
                if len(fields) < 4 or not fields[0].isdigit() or not fields[1].isdigit():
                    continue
                # Devices may be listed more than once: the first one wins (as in Go).
                self._names.setdefault((int(fields[0]), int(fields[1])), "/dev/" + fields[3])
        key = (major, minor)
        name = self._names.get(key)
        if name is None:
            try:
                link = os.readlink(os.path.join(self._sys_root, "dev", "block", f"{major}:{minor}"))
                name = "/dev/" + os.path.basename(link)
            except OSError:
                name = ""
            self._names[key] = name
        return name


# --------------------------------------------------------------------------- v1 metrics


def _v1_memory(d: str, m: v1pb.Metrics) -> None:
    raw = _read_kv(os.path.join(d, "memory.stat"))
    if raw is None:
        return
    mem = m.memory
    fields = {
        "cache": "cache",
        "rss": "rss",
        "rss_huge": "rss_huge",
        "mapped_file": "mapped_file",
        "dirty": "dirty",
        "writeback": "writeback",
        "pgpgin": "pg_pg_in",
        "pgpgout": "pg_pg_out",
        "pgfault": "pg_fault",
        "pgmajfault": "pg_maj_fault",
        "inactive_anon": "inactive_anon",
        "active_anon": "active_anon",
        "inactive_file": "inactive_file",
        "active_file": "active_file",
        "unevictable": "unevictable",
    }
    for key, attr in fields.items():
        setattr(mem, attr, raw.get(key, 0))
        setattr(mem, "total_" + attr, raw.get("total_" + key, 0))
    mem.hierarchical_memory_limit = raw.get("hierarchical_memory_limit", 0)
    mem.hierarchical_swap_limit = raw.get("hierarchical_memsw_limit", 0)

    for module, entry in (
        ("memory.", mem.usage),
        ("memory.memsw.", mem.swap),
        ("memory.kmem.", mem.kernel),
        ("memory.kmem.tcp.", mem.kernel_tcp),
    ):
        entry.SetInParent()
        for name, attr in (
            ("usage_in_bytes", "usage"),
            ("max_usage_in_bytes", "max"),
            ("failcnt", "failcnt"),
            ("limit_in_bytes", "limit"),
        ):
            v = _read_uint(os.path.join(d, module + name))
            if v is not None:
                setattr(entry, attr, v)

    oom = _read_kv(os.path.join(d, "memory.oom_control"))
    if oom is not None:
        o = m.memory_oom_control
        o.SetInParent()
        o.oom_kill_disable = oom.get("oom_kill_disable", 0)
        o.under_oom = oom.get("under_oom", 0)
        o.oom_kill = oom.get("oom_kill", 0)


def _v1_cpuacct(d: str, m: v1pb.Metrics) -> None:
    usage = m.cpu.usage
    stat = read_text(os.path.join(d, "cpuacct.stat"))
    if stat is not None:
        fields = stat.split()
        ticks = _clock_ticks()
        # "user N\nsystem N": USER_HZ ticks, converted to nanoseconds.
        for i in range(0, len(fields) - 1, 2):
            v = _parse_uint(fields[i + 1])
            if v is None:
                continue
            if fields[i] == "user":
                usage.user = v * _NS_PER_SEC // ticks
            elif fields[i] == "system":
                usage.kernel = v * _NS_PER_SEC // ticks
    total = _read_uint(os.path.join(d, "cpuacct.usage"))
    if total is not None:
        usage.total = total
    percpu = read_text(os.path.join(d, "cpuacct.usage_percpu"))
    if percpu is not None:
        values = [_parse_uint(v) for v in percpu.split()]
        usage.per_cpu[:] = [v or 0 for v in values]


def _v1_cpu(d: str, m: v1pb.Metrics) -> None:
    raw = _read_kv(os.path.join(d, "cpu.stat"))
    if raw is None:
        return
    t = m.cpu.throttling
    t.periods = raw.get("nr_periods", 0)
    t.throttled_periods = raw.get("nr_throttled", 0)
    t.throttled_time = raw.get("throttled_time", 0)


def _v1_pids(d: str, m: v1pb.Metrics) -> None:
    current = _read_uint(os.path.join(d, "pids.current"))
    if current is None:
        return
    m.pids.current = current
    limit = read_text(os.path.join(d, "pids.max"))
    if limit is not None and limit.strip() != "max":
        m.pids.limit = _parse_uint(limit.strip()) or 0


def parse_blkio(text: str) -> list[tuple[int, int, str, int]]:
    """``8:0 Read 123`` / ``8:0 123`` lines as (major, minor, op, value); ``Total`` is skipped."""
    out = []
    for line in text.splitlines():
        fields = line.replace(":", " ").split()
        if len(fields) < 3:
            continue
        major, minor = _parse_uint(fields[0]), _parse_uint(fields[1])
        value = _parse_uint(fields[3] if len(fields) >= 4 else fields[2])
        if major is None or minor is None or value is None:
            continue
        out.append((major, minor, fields[2] if len(fields) >= 4 else "", value))
    return out


def _add_blkio(
    entries: RepeatedCompositeFieldContainer[v1pb.BlkIOEntry], text: str, devices: _Devices
) -> None:
    for major, minor, op, value in parse_blkio(text):
        entries.add(op=op, device=devices.name(major, minor), major=major, minor=minor, value=value)


def _v1_blkio(d: str, m: v1pb.Metrics, devices: _Devices) -> None:
    if not os.path.isdir(d):
        return
    b = m.blkio
    b.SetInParent()
    size = 0
    # CFQ statistics when the kernel has them, else the throttle.* files (as Go does).
    if os.path.lexists(os.path.join(d, "blkio.io_serviced_recursive")):
        for name, entries in (
            ("sectors_recursive", b.sectors_recursive),
            ("io_service_bytes_recursive", b.io_service_bytes_recursive),
            ("io_serviced_recursive", b.io_serviced_recursive),
            ("io_queued_recursive", b.io_queued_recursive),
            ("io_service_time_recursive", b.io_service_time_recursive),
            ("io_wait_time_recursive", b.io_wait_time_recursive),
            ("io_merged_recursive", b.io_merged_recursive),
            ("time_recursive", b.io_time_recursive),
        ):
            text = read_text(os.path.join(d, "blkio." + name))
            if text is not None:
                _add_blkio(entries, text, devices)
                size += len(entries)
    if size:
        return
    for name, entries in (
        ("throttle.io_serviced", b.io_serviced_recursive),
        ("throttle.io_service_bytes", b.io_service_bytes_recursive),
    ):
        text = read_text(os.path.join(d, "blkio." + name))
        if text is not None:
            _add_blkio(entries, text, devices)


def _v1_hugetlb(d: str, m: v1pb.Metrics) -> None:
    for size in _hugetlb_sizes(d, "usage_in_bytes"):
        entry = m.hugetlb.add(pagesize=size)
        for name, attr in (
            ("usage_in_bytes", "usage"),
            ("max_usage_in_bytes", "max"),
            ("failcnt", "failcnt"),
        ):
            v = _read_uint(os.path.join(d, f"hugetlb.{size}.{name}"))
            if v is not None:
                setattr(entry, attr, v)


def _v1_rdma(d: str, m: v1pb.Metrics) -> None:
    current = read_text(os.path.join(d, "rdma.current"))
    limit = read_text(os.path.join(d, "rdma.max"))
    if current is None or limit is None:
        return
    current_lines, limit_lines = current.split("\n"), limit.split("\n")
    if len(current_lines) != len(limit_lines):
        return  # a device went away between the two reads
    r = m.rdma
    r.SetInParent()
    for lines, entries in ((current_lines, r.current), (limit_lines, r.limit)):
        for dev, handles, objects in _rdma_entries(lines):
            entries.add(device=dev, hca_handles=handles, hca_objects=objects)


def v1_metrics(
    dirs: Mapping[str, str], *, proc_root: str = "/proc", sys_root: str = "/sys"
) -> v1pb.Metrics:
    """Read ``io.containerd.cgroups.v1.Metrics`` from v1 cgroup directories.

    ``dirs`` maps controller names (``memory``, ``cpu``, ``cpuacct``, ``pids``,
    ``blkio``, ``hugetlb``, ``rdma``) to the cgroup's directory in that
    hierarchy. Missing controllers and files are skipped (Go's IgnoreNotExist).
    """
    from containerd_shim.api.cgroups.stats.v1 import metrics_pb2 as pb

    m = pb.Metrics()
    # As in Go, cpu (with usage and throttling) is always present.
    m.cpu.usage.SetInParent()
    m.cpu.throttling.SetInParent()
    devices = _Devices(proc_root, sys_root)
    for controller, d in dirs.items():
        if controller == "memory":
            _v1_memory(d, m)
        elif controller == "cpuacct":
            _v1_cpuacct(d, m)
        elif controller == "cpu":
            _v1_cpu(d, m)
        elif controller == "pids":
            _v1_pids(d, m)
        elif controller == "blkio":
            _v1_blkio(d, m, devices)
        elif controller == "hugetlb":
            _v1_hugetlb(d, m)
        elif controller == "rdma":
            _v1_rdma(d, m)
    return m


# --------------------------------------------------------------------------- v2 metrics

_V2_MEMORY_FIELDS = (
    "anon",
    "file",
    "kernel_stack",
    "slab",
    "sock",
    "shmem",
    "file_mapped",
    "file_dirty",
    "file_writeback",
    "anon_thp",
    "inactive_anon",
    "active_anon",
    "inactive_file",
    "active_file",
    "unevictable",
    "slab_reclaimable",
    "slab_unreclaimable",
    "pgfault",
    "pgmajfault",
    "workingset_refault",
    "workingset_activate",
    "workingset_nodereclaim",
    "pgrefill",
    "pgscan",
    "pgsteal",
    "pgactivate",
    "pgdeactivate",
    "pglazyfree",
    "pglazyfreed",
    "thp_fault_alloc",
    "thp_collapse_alloc",
)


def parse_io_stat(text: str) -> list[tuple[int, int, dict[str, int]]]:
    """io.stat lines (``8:0 rbytes=1 wbytes=2 rios=3 wios=4 ...``) as (major, minor, values)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        major_s, sep, minor_s = parts[0].partition(":")
        major, minor = _parse_uint(major_s), _parse_uint(minor_s)
        if not sep or major is None or minor is None:
            continue
        values: dict[str, int] = {}
        for kv in parts[1:]:
            key, sep, raw = kv.partition("=")
            v = _parse_uint(raw) if sep else None
            if v is not None:
                values[key] = v
        out.append((major, minor, values))
    return out


def v2_metrics(path: str) -> v2pb.Metrics:
    """Read ``io.containerd.cgroups.v2.Metrics`` from the cgroup2 directory ``path``.

    Missing files are skipped; as in Go, ``max`` limits read as MaxUint64.
    """
    from containerd_shim.api.cgroups.v2.stats import metrics_pb2 as pb

    def j(name: str) -> str:
        return os.path.join(path, name)

    m = pb.Metrics()
    m.pids.current = _read_uint_or_max(j("pids.current"))
    m.pids.limit = _read_uint_or_max(j("pids.max"))

    cpu = _read_kv(j("cpu.stat")) or {}
    m.cpu.usage_usec = cpu.get("usage_usec", 0)
    m.cpu.user_usec = cpu.get("user_usec", 0)
    m.cpu.system_usec = cpu.get("system_usec", 0)
    m.cpu.nr_periods = cpu.get("nr_periods", 0)
    m.cpu.nr_throttled = cpu.get("nr_throttled", 0)
    m.cpu.throttled_usec = cpu.get("throttled_usec", 0)

    mem = _read_kv(j("memory.stat")) or {}
    for name in _V2_MEMORY_FIELDS:
        setattr(m.memory, name, mem.get(name, 0))
    m.memory.usage = _read_uint_or_max(j("memory.current"))
    m.memory.usage_limit = _read_uint_or_max(j("memory.max"))
    m.memory.swap_usage = _read_uint_or_max(j("memory.swap.current"))
    m.memory.swap_limit = _read_uint_or_max(j("memory.swap.max"))

    events = _read_kv(j("memory.events"))
    if events:
        m.memory_events.CopyFrom(
            pb.MemoryEvents(
                low=events.get("low", 0),
                high=events.get("high", 0),
                max=events.get("max", 0),
                oom=events.get("oom", 0),
                oom_kill=events.get("oom_kill", 0),
            )
        )

    m.io.SetInParent()
    for major, minor, values in parse_io_stat(read_text(j("io.stat")) or ""):
        m.io.usage.add(
            major=major,
            minor=minor,
            rbytes=values.get("rbytes", 0),
            wbytes=values.get("wbytes", 0),
            rios=values.get("rios", 0),
            wios=values.get("wios", 0),
        )

    m.rdma.SetInParent()
    for name, entries in (("rdma.current", m.rdma.current), ("rdma.max", m.rdma.limit)):
        for dev, handles, objects in _rdma_entries((read_text(j(name)) or "").splitlines()):
            entries.add(device=dev, hca_handles=handles, hca_objects=objects)

    sizes = set(_hugetlb_sizes(path, "current")) | set(_hugetlb_sizes(path, "max"))
    for size in sorted(sizes, key=_pagesize_key):
        m.hugetlb.add(
            pagesize=size,
            current=_read_uint_or_max(j(f"hugetlb.{size}.current")),
            max=_read_uint_or_max(j(f"hugetlb.{size}.max")),
        )
    return m


def _pack(msg: Message) -> AnyPb:
    from google.protobuf.any_pb2 import Any

    # containerd's typeurl names protobuf messages by their full name, with no prefix.
    return Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


# --------------------------------------------------------------------------- OOM watching


class _Watch:
    """One watched file descriptor: a v1 eventfd or an open v2 memory.events."""

    __slots__ = ("cgroup_dir", "container_id", "fd", "key", "last", "on_oom")

    def __init__(
        self,
        container_id: str,
        fd: int,
        cgroup_dir: str,
        on_oom: Callable[[str], None],
        key: str | None = None,
        last: int = 0,
    ) -> None:
        self.container_id = container_id
        self.fd = fd
        self.cgroup_dir = cgroup_dir
        self.on_oom = on_oom
        #: v2: the memory.events counter watched; None for a v1 eventfd.
        self.key = key
        self.last = last


class Cgroups:
    """Stats and OOM watching for the containers of one shim.

    Thread safe. The OOM thread (one for all containers) starts with the first
    :meth:`watch`; ``on_oom`` callbacks run on it and must not block for long.
    """

    #: v2: the file watched for OOM kills, and its counter.
    v2_events_file = "memory.events"
    v2_events_key = "oom_kill"

    def __init__(
        self,
        *,
        proc_root: str = "/proc",
        sys_root: str = "/sys",
        mounts: Sequence[Mount] | None = None,
    ) -> None:
        """``proc_root``, ``sys_root`` and ``mounts`` are for tests; the defaults are the host's."""
        self._proc_root = proc_root
        self._sys_root = sys_root
        self._mounts: list[Mount] | None = list(mounts) if mounts is not None else None
        self._lock = threading.Lock()
        self._watches: dict[int, _Watch] = {}
        # container id -> (pid, v1 {controller: dir} or v2 {"": dir})
        self._paths: dict[str, tuple[int, dict[str, str]]] = {}
        self._epoll: select.epoll | None = None
        self._wake = -1
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---------------------------------------------------------------- paths

    def _get_mounts(self) -> list[Mount]:
        if self._mounts is None:
            self._mounts = read_mounts(self._proc_root)
        return self._mounts

    def _resolve(self, container_id: str, pid: int) -> tuple[bool, dict[str, str]]:
        """``(is_v1, dirs)`` of the cgroup of ``pid``; NOT_FOUND if it is gone.

        dirs maps v1 controllers to directories, or ``""`` to the v2 directory.
        """
        mounts = self._get_mounts()
        v1 = is_v1(mounts)
        dirs: dict[str, str] = {}
        with self._lock:
            cached = self._paths.get(container_id)
        if cached is not None and cached[0] == pid:
            dirs = cached[1]
        else:
            try:
                with open(os.path.join(self._proc_root, str(pid), "cgroup"), encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise RpcError(
                    Code.NOT_FOUND, f"cgroup of container {container_id} (pid {pid}): {e}"
                ) from None
            controllers, unified = parse_proc_cgroup(text)
            if v1:
                for name in _V1_STAT_CONTROLLERS:
                    path = controllers.get(name)
                    if path is None:
                        continue
                    for m in mounts:
                        if m.version == 1 and m.has(name):
                            dirs[name] = under(m, path)
                            break
            elif unified is not None:
                for m in mounts:
                    if m.version == 2:
                        dirs[""] = under(m, unified)
                        break
        existing = {k: d for k, d in dirs.items() if os.path.isdir(d)}
        if not existing:
            raise RpcError(
                Code.NOT_FOUND, f"cgroup of container {container_id} (pid {pid}) does not exist"
            )
        with self._lock:
            if not self._closed:
                self._paths[container_id] = (pid, dirs)
        return v1, existing

    # ---------------------------------------------------------------- stats

    def stats(self, container_id: str, pid: int) -> AnyPb:
        """The metrics of the cgroup of ``pid`` (the container's init), packed as Any.

        ``io.containerd.cgroups.v1.Metrics`` when v1 controllers are mounted
        (v1 and hybrid hosts), else ``io.containerd.cgroups.v2.Metrics``; the
        ``type_url`` is the message's full name, as containerd's typeurl
        writes it. Raises ``RpcError(NOT_FOUND)`` if the cgroup is gone.
        """
        v1, dirs = self._resolve(container_id, pid)
        if v1:
            return _pack(v1_metrics(dirs, proc_root=self._proc_root, sys_root=self._sys_root))
        return _pack(v2_metrics(dirs[""]))

    # ---------------------------------------------------------------- OOM

    def watch(self, container_id: str, pid: int, on_oom: Callable[[str], None]) -> None:
        """Call ``on_oom(container_id)`` for each OOM event of the cgroup of ``pid``.

        Best effort: if the memory cgroup cannot be found or watched, this logs
        and returns. Watching a container again replaces its previous watch.
        """
        try:
            v1, dirs = self._resolve(container_id, pid)
        except (RpcError, OSError) as e:
            log.warning("oom: not watching container %s: %s", container_id, e)
            return
        d = dirs.get("memory" if v1 else "")
        if d is None:
            log.warning("oom: container %s has no memory cgroup", container_id)
            return
        try:
            if v1:
                w = self._open_v1(container_id, d, on_oom)
            else:
                w = self._open_v2(container_id, d, on_oom)
        except (OSError, ValueError) as e:
            log.warning("oom: cannot watch container %s (%s): %s", container_id, d, e)
            return
        with self._lock:
            if self._closed:
                os.close(w.fd)
                log.warning("oom: not watching container %s: closed", container_id)
                return
            self._unwatch_locked(container_id)
            if w.key is None:
                mask = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
            else:
                mask = select.EPOLLPRI | select.EPOLLERR
            try:
                ep = self._start_locked()
                ep.register(w.fd, mask)
            except OSError as e:
                os.close(w.fd)
                log.warning("oom: cannot watch container %s: %s", container_id, e)
                return
            self._watches[w.fd] = w

    def _open_v1(self, container_id: str, d: str, on_oom: Callable[[str], None]) -> _Watch:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ofd = os.open(os.path.join(d, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                cfd = os.open(os.path.join(d, "cgroup.event_control"), os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(cfd, f"{efd} {ofd}".encode())
                finally:
                    os.close(cfd)
            finally:
                os.close(ofd)
        except BaseException:
            os.close(efd)
            raise
        return _Watch(container_id, efd, d, on_oom)

    def _open_v2(self, container_id: str, d: str, on_oom: Callable[[str], None]) -> _Watch:
        fd = os.open(os.path.join(d, self.v2_events_file), os.O_RDONLY | os.O_CLOEXEC)
        try:
            # Reading also acknowledges any pending kernfs notification.
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            last = _parse_kv(text).get(self.v2_events_key, 0)
        except BaseException:
            os.close(fd)
            raise
        return _Watch(container_id, fd, d, on_oom, key=self.v2_events_key, last=last)

    def _start_locked(self) -> select.epoll:
        if self._epoll is not None:
            return self._epoll
        ep = select.epoll()
        try:
            wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                ep.register(wake, select.EPOLLIN)
                thread = threading.Thread(
                    target=self._run, args=(ep, wake), name="cgroups-oom", daemon=True
                )
                thread.start()
            except BaseException:
                os.close(wake)
                raise
        except BaseException:
            ep.close()
            raise
        self._epoll, self._wake, self._thread = ep, wake, thread
        return ep

    def _run(self, ep: select.epoll, wake: int) -> None:
        try:
            while True:
                try:
                    events = ep.poll()
                except OSError as e:  # EINTR is retried by Python itself
                    log.error("oom: epoll wait: %s", e)
                    return
                for fd, _mask in events:
                    if fd == wake:
                        with self._lock:
                            if self._closed:
                                return
                        continue
                    try:
                        self._process(fd)
                    except Exception:
                        log.exception("oom: handling fd %d", fd)
        finally:
            with self._lock:
                ep.close()
                os.close(wake)
                self._epoll, self._wake = None, -1

    def _process(self, fd: int) -> None:
        # The fd is read under the lock: forget()/close() cannot close it (and the number
        # cannot be reused for something else) in between.
        with self._lock:
            w = self._watches.get(fd)
            if w is None:
                return
            if w.key is None:
                try:
                    os.eventfd_read(fd)
                except OSError:  # EAGAIN: an event for an fd number since reused
                    return
                # The eventfd is also signalled when the cgroup is removed.
                if not os.path.isdir(w.cgroup_dir):
                    self._remove_locked(w)
                    return
                fire = True
            else:
                try:
                    data = os.pread(fd, 4096, 0)
                except OSError:  # ENODEV: the cgroup was removed
                    self._remove_locked(w)
                    return
                value = _parse_kv(data.decode(errors="replace")).get(w.key)
                if value is None:
                    return
                fire = value > w.last
                w.last = value
        if fire:
            try:
                w.on_oom(w.container_id)
            except Exception:
                log.exception("oom: callback for container %s failed", w.container_id)

    def _remove_locked(self, w: _Watch) -> None:
        if self._watches.pop(w.fd, None) is None:
            return
        if self._epoll is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(w.fd)
        os.close(w.fd)

    def _unwatch_locked(self, container_id: str) -> None:
        for w in [w for w in self._watches.values() if w.container_id == container_id]:
            self._remove_locked(w)

    def forget(self, container_id: str) -> None:
        """Stop watching the container and drop what is known of it (idempotent)."""
        with self._lock:
            self._unwatch_locked(container_id)
            self._paths.pop(container_id, None)

    def close(self) -> None:
        """Stop all watches and the OOM thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in list(self._watches.values()):
                self._remove_locked(w)
            self._paths.clear()
            thread = self._thread
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def __enter__(self) -> Cgroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
