"""Benchmark ttrpc against grpcio and Go ttrpc: ``python bench/run.py [--quick] [--json FILE]``.

Everything is measured side by side in one invocation, on unix sockets in a
temporary directory, each server in its own process and each client in another:

* Echo (16 B and 1 MiB ``EchoRequest.data``): one-call-in-flight p50/p99
  latency and calls/s with 1, 8 and 64 calls in flight on one connection, for
  ttrpc (asyncio, uvloop, blocking and cross pairings), grpcio (aio, sync) and
  Go ttrpc (the tests/interop go-server and bench/go/go-bench);
* the same Echo through two interceptors on each side (``+icpt`` pairings);
* streams: 100k messages of 16 B through one stream of each kind
  (server-streaming, client-streaming, bidi) on ttrpc and grpcio, against Go
  ttrpc's unary rate (Go 1.1.1 has no streams) measured in the same run;
* server memory (/proc/PID/smaps_rollup) idle and after 100k 16 B calls;
* ``import`` time of ttrpc and grpc, and installed size of each with protobuf.

It then prints markdown tables, ratios vs grpcio and Go, and the issue's
targets marked met or missed. ``--quick`` is a ~1 minute smoke run (fewer
calls; its numbers are noisier). Nothing here asserts timing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import platform
import py_compile
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SRC = ROOT / "src"
PROTO_DIR = ROOT / "tests" / "interop"
PEERS = BENCH / "peers.py"

MiB = 1 << 20
SIZES = (16, MiB)
LEVELS = (1, 8, 64)

# Per payload size: rounds over all pairings (medians kept; each round a fresh
# server and client), then per round: warmup calls, latency calls (their total
# over the rounds; time bound per round) and, per in-flight level, runs of
# ``duration`` seconds (at most ``max_calls``).
FULL_PLAN = {
    16: {"rounds": 3, "warmup": 1000, "lat_calls": 18000, "lat_seconds": 8.0,
         "duration": 0.8, "repeats": 1, "max_calls": 200_000},
    MiB: {"rounds": 3, "warmup": 10, "lat_calls": 360, "lat_seconds": 6.0,
          "duration": 0.8, "repeats": 1, "max_calls": 10_000},
}  # fmt: skip
QUICK_PLAN = {
    16: {"rounds": 1, "warmup": 200, "lat_calls": 2000, "lat_seconds": 2.0,
         "duration": 0.3, "repeats": 1, "max_calls": 50_000},
    MiB: {"rounds": 1, "warmup": 3, "lat_calls": 30, "lat_seconds": 2.0,
          "duration": 0.3, "repeats": 1, "max_calls": 1_000},
}  # fmt: skip


@dataclass(frozen=True)
class Pairing:
    label: str
    client: str  # a peers.py kind or "go"
    server: str
    # "ttrpc" (both ends Python ttrpc), "ttrpc+icpt" (the same with interceptors),
    # "mixed" (one end Go), "grpcio", "go"
    family: str


PAIRINGS = (
    Pairing("ttrpc asyncio → asyncio", "aio", "aio", "ttrpc"),
    Pairing("ttrpc uvloop → uvloop", "uvloop", "uvloop", "ttrpc"),
    Pairing("ttrpc blocking → blocking", "blocking", "blocking", "ttrpc"),
    Pairing("ttrpc blocking → uvloop", "blocking", "uvloop", "ttrpc"),
    Pairing("ttrpc blocking → asyncio", "blocking", "aio", "ttrpc"),
    Pairing("ttrpc asyncio → asyncio +icpt", "aio+icpt", "aio+icpt", "ttrpc+icpt"),
    Pairing("ttrpc uvloop → uvloop +icpt", "uvloop+icpt", "uvloop+icpt", "ttrpc+icpt"),
    Pairing("ttrpc blocking → blocking +icpt", "blocking+icpt", "blocking+icpt", "ttrpc+icpt"),
    Pairing("grpcio aio → aio", "grpc-aio", "grpc-aio", "grpcio"),
    Pairing("grpcio sync → sync", "grpc-sync", "grpc-sync", "grpcio"),
    Pairing("Go ttrpc → Go ttrpc", "go", "go", "go"),
    Pairing("ttrpc blocking → Go", "blocking", "go", "mixed"),
    Pairing("Go → ttrpc asyncio", "go", "aio", "mixed"),
    Pairing("Go → ttrpc uvloop", "go", "uvloop", "mixed"),
    Pairing("Go → ttrpc blocking", "go", "blocking", "mixed"),
)
DEFAULT_PAIRING = "ttrpc asyncio → asyncio"
GRPC_AIO = "grpcio aio → aio"

STREAM_PAIRINGS = (
    Pairing("ttrpc asyncio → asyncio", "aio", "aio", "ttrpc"),
    Pairing("ttrpc uvloop → uvloop", "uvloop", "uvloop", "ttrpc"),
    Pairing("ttrpc blocking → blocking", "blocking", "blocking", "ttrpc"),
    Pairing("ttrpc blocking → uvloop", "blocking", "uvloop", "ttrpc"),
    Pairing("ttrpc asyncio → asyncio +icpt", "aio+icpt", "aio+icpt", "ttrpc+icpt"),
    Pairing("grpcio aio → aio", "grpc-aio", "grpc-aio", "grpcio"),
    Pairing("grpcio sync → sync", "grpc-sync", "grpc-sync", "grpcio"),
)
STREAM_KINDS = ("server", "client", "bidi")
STREAM_PLAN = {"count": 100_000, "size": 16, "repeats": 3}
STREAM_PLAN_QUICK = {"count": 100_000, "size": 16, "repeats": 1}
GO_GO = "Go ttrpc → Go ttrpc"

MEMORY_SERVERS = ("aio", "uvloop", "blocking", "grpc-aio", "grpc-sync", "go")
SERVER_NAMES = {
    "aio": "ttrpc asyncio",
    "uvloop": "ttrpc uvloop",
    "blocking": "ttrpc blocking",
    "grpc-aio": "grpcio aio",
    "grpc-sync": "grpcio sync",
    "go": "Go ttrpc",
}
# (import statement, label); interop_* are the code generated from interop.proto.
IMPORTS = (
    ("ttrpc", "ttrpc"),
    ("ttrpc.aio", "ttrpc.aio"),
    ("ttrpc.blocking", "ttrpc.blocking"),
    ("grpc", "grpc"),
    ("grpc.aio", "grpc.aio"),
    ("interop_pb2", "protobuf + generated messages (shared floor)"),
    ("ttrpc.aio, interop_ttrpc", "ttrpc.aio + generated service"),
    ("grpc.aio, interop_pb2_grpc", "grpc.aio + generated service"),
)


class BenchError(Exception):
    pass


# -- processes -----------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in each child before exec: SIGKILL it if this runner dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def use_checkout() -> None:
    """Make this process and its children import ttrpc from this checkout's src/.

    (The installed editable ttrpc may point at another checkout.)
    """
    if str(SRC) not in sys.path:
        sys.path.insert(1, str(SRC))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *([old] if old else [])])


def generate_code(gen: Path) -> None:
    """ttrpc and grpc code for tests/interop/{interop,streaming}.proto, into a new ``gen``."""
    gen.mkdir()
    protos = [str(PROTO_DIR / "interop.proto"), str(PROTO_DIR / "streaming.proto")]
    out = str(gen)
    for cmd in (
        [sys.executable, "-m", "ttrpc.protoc", f"-I{PROTO_DIR}", f"--python_out={out}",
         f"--pyi_out={out}", f"--ttrpc_out={out}", *protos],
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
         f"--python_out={out}", f"--grpc_python_out={out}", *protos],
    ):  # fmt: skip
        subprocess.run(cmd, check=True, timeout=120)


def peer_kind(kind: str) -> tuple[str, list[str]]:
    """A pairing's kind as peers.py takes it: ``aio+icpt`` is ``aio --interceptors``."""
    if kind.endswith("+icpt"):
        return kind[: -len("+icpt")], ["--interceptors"]
    return kind, []


class Processes:
    """Every child this runner starts; :meth:`close` ends those still running."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], *, stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # Ctrl-C reaches only the runner, which then cleans up
            preexec_fn=_die_with_parent,
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in list(self._procs):
            self.stop(proc, grace=2.0)


def wait_ready(proc: subprocess.Popen[bytes], errlog: Path, timeout: float) -> None:
    """Wait for a server's READY line on its stdout."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"READY" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or proc.poll() is not None:
                raise BenchError(f"server did not start: {errlog.read_text()[-2000:]}")
            if sel.select(min(remaining, 0.5)):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise BenchError(f"server exited: {errlog.read_text()[-2000:]}")
                buf += chunk


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.gen = tmp / "gen"
        self.go_bin: Path | None = None
        self.have_uvloop = importlib.util.find_spec("uvloop") is not None
        self.plan = QUICK_PLAN if args.quick else FULL_PLAN
        self._sock_seq = 0
        self.notes: list[str] = []
        self.t0 = time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- setup --

    def generate(self) -> None:
        generate_code(self.gen)

    def build_go(self) -> None:
        if self.args.no_go:
            self.notes.append("Go pairings skipped (--no-go).")
            return
        if self.args.go_bin:
            self.go_bin = Path(self.args.go_bin).resolve()
            return
        out = self.tmp / "go"
        self.log("building Go peers (bench/go/build.sh) ...")
        try:
            subprocess.run(
                ["sh", str(BENCH / "go" / "build.sh"), str(out)],
                check=True, timeout=600, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        except (subprocess.SubprocessError, OSError) as exc:
            self.notes.append(f"Go pairings skipped: build failed ({exc}).")
            self.log(f"Go build failed: {exc}")
            return
        self.go_bin = out

    def available(self, kind: str) -> bool:
        kind = peer_kind(kind)[0]
        if kind == "go":
            return self.go_bin is not None
        if kind == "uvloop":
            return self.have_uvloop
        return True

    # -- servers and clients --

    def socket_path(self) -> Path:
        self._sock_seq += 1
        return self.tmp / f"s{self._sock_seq}.sock"

    @contextlib.contextmanager
    def server(self, kind: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
        path = self.socket_path()
        if kind == "go":
            assert self.go_bin is not None
            argv = [str(self.go_bin / "go-server"), f"unix://{path}"]
        else:
            base, extra = peer_kind(kind)
            argv = [
                sys.executable, str(PEERS), "server", base, str(path), "--gen", str(self.gen),
                *extra,
            ]  # fmt: skip
        errlog = self.tmp / f"{path.stem}.stderr"
        with open(errlog, "wb") as err:
            proc = self.procs.start(argv, stdout=subprocess.PIPE, stderr=err)
        try:
            wait_ready(proc, errlog, 30.0)
            yield proc, path
        finally:
            self.procs.stop(proc)

    def client(
        self,
        kind: str,
        path: Path,
        *,
        size: int,
        warmup: int,
        lat_calls: int,
        lat_seconds: float,
        levels: Sequence[int],
        duration: float,
        max_calls: int,
        repeats: int = 1,
        server_pid: int | None = None,
    ) -> dict[str, Any]:
        """Run a client to completion; its JSON result plus ``foreign_cpu``: the CPUs
        other processes (not this runner, the client or the server) used meanwhile."""
        inflight = ",".join(str(n) for n in levels)
        if kind == "go":
            assert self.go_bin is not None
            argv = [
                str(self.go_bin / "go-bench"), "-addr", f"unix://{path}", "-size", str(size),
                "-warmup", str(warmup), "-lat-calls", str(lat_calls),
                "-lat-seconds", str(lat_seconds), "-inflight", inflight,
                "-duration", str(duration), "-repeats", str(repeats),
                "-max-calls", str(max_calls),
            ]  # fmt: skip
        else:
            base, extra = peer_kind(kind)
            argv = [
                sys.executable, str(PEERS), "client", base, str(path), "--gen", str(self.gen),
                *extra,
                "--size", str(size), "--warmup", str(warmup), "--lat-calls", str(lat_calls),
                "--lat-seconds", str(lat_seconds), "--inflight", inflight,
                "--duration", str(duration), "--repeats", str(repeats),
                "--max-calls", str(max_calls),
            ]  # fmt: skip
        # Bounds: latency phase, each level plus its warmup, generous slack for start-up.
        timeout = lat_seconds + len(levels) * (repeats * duration + 10.0) + 60.0
        return self.run_json(kind, argv, timeout, server_pid)

    def run_json(
        self, kind: str, argv: list[str], timeout: float, server_pid: int | None
    ) -> dict[str, Any]:
        """Run a measuring child to completion: the JSON object it prints last, plus
        ``foreign_cpu``."""
        with (
            tempfile.TemporaryFile(dir=self.tmp) as out,
            tempfile.TemporaryFile(dir=self.tmp) as err,
        ):
            busy0, own0 = cpu_busy_seconds(), own_cpu_seconds() + process_cpu_seconds(server_pid)
            t0 = time.monotonic()
            proc = self.procs.start(argv, stdout=out, stderr=err)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"client {kind} timed out after {timeout:.0f}s") from None
            finally:
                self.procs.stop(proc)
            out.seek(0)
            err.seek(0)
            if proc.returncode != 0:
                raise BenchError(
                    f"client {kind} failed ({proc.returncode}): {err.read().decode()[-2000:]}"
                )
            lines = out.read().decode().strip().splitlines()
        if not lines:
            raise BenchError(f"client {kind} printed nothing")
        result: dict[str, Any] = json.loads(lines[-1])
        ours = own_cpu_seconds() + process_cpu_seconds(server_pid) - own0
        result["foreign_cpu"] = max(
            0.0, (cpu_busy_seconds() - busy0 - ours) / (time.monotonic() - t0)
        )
        return result

    # -- phases --

    def streams(self) -> dict[str, Any]:
        """100k small messages through one stream of each kind, per pairing; and Go's
        unary rate in the same run (Go ttrpc 1.1.1 has no streams)."""
        plan = STREAM_PLAN_QUICK if self.args.quick else STREAM_PLAN
        results: dict[str, Any] = {"plan": plan, "pairings": {}}
        for p in STREAM_PAIRINGS:
            if not (self.available(p.client) and self.available(p.server)):
                continue
            if self.args.pairing not in p.label:
                continue
            row: dict[str, Any] = {}
            for kind in STREAM_KINDS:
                self.log(f"streams: {p.label}, {kind} ({plan['count']:,} messages)")
                base, extra = peer_kind(p.client)
                try:
                    with self.server(p.server) as (server, path):
                        argv = [
                            sys.executable, str(PEERS), "stream", base, str(path),
                            "--gen", str(self.gen), *extra, "--stream-kind", kind,
                            "--count", str(plan["count"]), "--size", str(plan["size"]),
                            "--repeats", str(plan["repeats"]),
                        ]  # fmt: skip
                        row[kind] = self.run_json(p.client, argv, 600.0, server.pid)
                except BenchError as exc:
                    self.log(f"  error: {exc}")
                    row[kind] = {"error": str(exc)}
            results["pairings"][p.label] = row
        if self.available("go"):
            self.log("streams: Go ttrpc unary reference (Go 1.1.1 has no streams)")
            try:
                with self.server("go") as (server, path):
                    results["go_unary"] = self.client(
                        "go", path, size=plan["size"], warmup=200, lat_calls=0, lat_seconds=0.0,
                        levels=(1, 64), duration=1.0, max_calls=plan["count"],
                        repeats=plan["repeats"], server_pid=server.pid,
                    )  # fmt: skip
            except BenchError as exc:
                self.log(f"  error: {exc}")
        return results

    def echo(self) -> dict[str, dict[str, Any]]:
        """Every pairing, in rounds: time-varying noise (a busy host) hits all of them alike."""
        results: dict[str, dict[str, Any]] = {}
        pairings = [
            p
            for p in PAIRINGS
            if self.args.pairing in p.label
            and self.available(p.client)
            and self.available(p.server)
        ]
        for size in SIZES:
            plan = dict(self.plan[size])
            rounds = int(plan.pop("rounds"))
            plan["lat_calls"] = -(-int(plan["lat_calls"]) // rounds)
            runs: dict[str, list[dict[str, Any]]] = {p.label: [] for p in pairings}
            for r in range(rounds):
                for p in pairings:
                    self.log(f"echo {size_label(size)}, round {r + 1}/{rounds}: {p.label}")
                    try:
                        with self.server(p.server) as (server, path):
                            runs[p.label].append(
                                self.client(
                                    p.client,
                                    path,
                                    size=size,
                                    levels=LEVELS,
                                    server_pid=server.pid,
                                    **plan,  # type: ignore[arg-type]
                                )
                            )
                    except BenchError as exc:
                        self.log(f"  error: {exc}")
                        runs[p.label].append({"error": str(exc)})
            results[size_label(size)] = {label: combine(rs) for label, rs in runs.items()}
        return results

    def memory(self) -> dict[str, Any]:
        calls = 10_000 if self.args.quick else 100_000
        results: dict[str, Any] = {"calls": calls, "servers": {}}
        for kind in MEMORY_SERVERS:
            if not self.available(kind):
                continue
            if kind.startswith("grpc"):
                load = "grpc-aio"
            elif self.go_bin is not None:
                load = "go"
            else:
                load = "uvloop" if self.have_uvloop else "aio"
            self.log(f"memory: {SERVER_NAMES[kind]} ({calls} calls from a {load} client)")
            try:
                with self.server(kind) as (proc, path):
                    time.sleep(1.0)
                    idle = smaps_rollup(proc.pid)
                    run = self.client(
                        load, path, size=16, warmup=0, lat_calls=0, lat_seconds=0.0,
                        levels=(64,), duration=120.0, max_calls=calls,
                    )  # fmt: skip
                    time.sleep(0.5)
                    after = smaps_rollup(proc.pid)
            except BenchError as exc:
                self.log(f"  error: {exc}")
                results["servers"][kind] = {"error": str(exc)}
                continue
            level = run["throughput"][0]
            results["servers"][kind] = {
                "idle": idle,
                "after": after,
                "load_client": load,
                "calls": level["calls"],
                "calls_per_s": level["calls_per_s"],
            }
        return results

    def imports(self) -> dict[str, Any]:
        """Fresh ``python -S`` per import (site's .pth hooks would pre-import modules).

        The import path is this interpreter's (plus the generated code), so the
        same packages are found; ``wall`` is the process's wall time minus a bare
        start-up, ``in-process`` the time around the import statement itself.
        """
        rounds = 3 if self.args.quick else 15
        path = [p for p in sys.path if p and Path(p).resolve() != BENCH]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(self.gen)])}
        self.log(f"import times: {rounds} rounds")

        def once(stmt: str | None) -> tuple[float, float]:
            code = "pass"
            if stmt is not None:
                code = (
                    "import time; t = time.perf_counter(); "
                    f"import {stmt}; print(time.perf_counter() - t)"
                )
            argv = [sys.executable, "-S", "-c", code]
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=self.tmp, env=env, stdout=subprocess.PIPE)
            # A watchdog instead of wait(timeout): that polls in steps of up to 50 ms.
            watchdog = threading.Timer(60.0, proc.kill)
            watchdog.start()
            try:
                out, _ = proc.communicate()
            finally:
                watchdog.cancel()
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise BenchError(f"python -c 'import {stmt}' failed")
            return wall, float(out) if stmt is not None else 0.0

        stmts = [stmt for stmt, _ in IMPORTS]
        for stmt in stmts:  # warm the page cache and the .pyc files
            once(stmt)
        bare: list[float] = []
        wall: dict[str, list[float]] = {s: [] for s in stmts}
        inproc: dict[str, list[float]] = {s: [] for s in stmts}
        for _ in range(rounds):
            bare.append(once(None)[0])
            for stmt in stmts:
                w, i = once(stmt)
                wall[stmt].append(w)
                inproc[stmt].append(i)
        bare_s = statistics.median(bare)
        return {
            "rounds": rounds,
            "bare_ms": bare_s * 1e3,
            "modules": {
                label: {
                    "statement": f"import {stmt}",
                    "wall_ms": (statistics.median(wall[stmt]) - bare_s) * 1e3,
                    "inprocess_ms": statistics.median(inproc[stmt]) * 1e3,
                }
                for stmt, label in IMPORTS
            },
        }

    def sizes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("ttrpc", "protobuf", "grpcio"):
            try:
                out[name] = distribution_size(name, self.tmp)
            except importlib.metadata.PackageNotFoundError:
                out[name] = None
        return out


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One pairing's rounds: median p50/p99 and median calls/s per level."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    out: dict[str, Any] = {"rounds": len(ok), "foreign_cpu": max(r["foreign_cpu"] for r in ok)}
    lats = [r["latency"] for r in ok if "latency" in r]
    if lats:
        out["latency"] = {
            "calls": sum(lat["calls"] for lat in lats),
            "p50_us": statistics.median(lat["p50_us"] for lat in lats),
            "p99_us": statistics.median(lat["p99_us"] for lat in lats),
            "p50_rounds": [lat["p50_us"] for lat in lats],
        }
    levels: dict[int, list[dict[str, Any]]] = {}
    for r in ok:
        for lvl in r["throughput"]:
            levels.setdefault(lvl["inflight"], []).append(lvl)
    out["throughput"] = [
        {
            "inflight": n,
            "calls_per_s": statistics.median(x["calls_per_s"] for x in lv),
            "runs": [x["calls_per_s"] for x in lv],
        }
        for n, lv in levels.items()
    ]
    if len(ok) < len(runs):
        out["errors"] = [r["error"] for r in runs if "error" in r]
    return out


def size_label(size: int) -> str:
    return "1 MiB" if size == MiB else f"{size} B"


# -- measurements --------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, int]:
    """RSS, PSS and private (clean + dirty) memory of a process, in KiB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return {
        "rss_kib": fields.get("Rss", 0),
        "pss_kib": fields.get("Pss", 0),
        "private_kib": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    }


def distribution_size(name: str, scratch: Path) -> dict[str, Any]:
    """Bytes of a distribution's installed files (with the .pyc files pip writes).

    An editable install lists no package files, so the package directory is
    walked instead: its files plus, for each module, the .pyc pip would write
    (compiled into ``scratch``); existing __pycache__ directories are skipped.
    """
    dist = importlib.metadata.distribution(name)
    total = 0
    count = 0
    package_files = 0
    for f in dist.files or ():
        p = Path(str(f.locate()))
        if p.is_file():
            total += p.stat().st_size
            count += 1
            if p.suffix in (".py", ".so"):
                package_files += 1
    editable = package_files == 0
    packages: dict[str, int] = {}
    if editable:
        for top in (dist.read_text("top_level.txt") or name).split():
            spec = importlib.util.find_spec(top)
            size = 0
            for loc in (spec.submodule_search_locations or []) if spec else []:
                for p in sorted(Path(loc).rglob("*")):
                    if not p.is_file() or "__pycache__" in p.parts:
                        continue
                    size += p.stat().st_size
                    count += 1
                    if p.suffix == ".py":
                        pyc = scratch / f"{count}.pyc"
                        py_compile.compile(str(p), cfile=str(pyc), doraise=True)
                        size += pyc.stat().st_size
                        count += 1
            packages[top] = size
            total += size
    return {
        "version": dist.version,
        "bytes": total,
        "files": count,
        "editable": editable,
        "packages": packages,
    }


def cpu_busy_seconds() -> float:
    """CPU time (all CPUs, all processes) spent not idle since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int | None) -> float:
    """CPU time of a running process (all its threads), 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this runner and of every child it has waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for dist in ("ttrpc", "protobuf", "grpcio", "grpcio-tools", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    with contextlib.suppress(Exception):
        from google.protobuf.internal import api_implementation

        versions["protobuf"] += f" ({api_implementation.Type()})"
    for key, argv in (
        ("go", ["go", "version"]),
        ("go ttrpc", ["dpkg-query", "-W", "-f=${Version}", "golang-github-containerd-ttrpc-dev"]),
    ):
        with contextlib.suppress(Exception):
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            versions[key] = out.removeprefix("go version ")
    spec = importlib.util.find_spec("ttrpc")
    return {
        "ttrpc_from": str(Path(spec.origin).parent) if spec and spec.origin else "?",
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


# -- report --------------------------------------------------------------------


def _get(results: dict[str, Any], size: str, label: str) -> dict[str, Any] | None:
    r = results.get("echo", {}).get(size, {}).get(label)
    return r if r and "error" not in r else None


def _p50(r: dict[str, Any] | None) -> float | None:
    return r["latency"]["p50_us"] if r and "latency" in r else None


def _rate(r: dict[str, Any] | None, inflight: int) -> float | None:
    if not r:
        return None
    for lvl in r["throughput"]:
        if lvl["inflight"] == inflight:
            return float(lvl["calls_per_s"])
    return None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _num(v: float | None, fmt: str = "{:,.0f}") -> str:
    return fmt.format(v) if v is not None else "-"


def _best_grpc_rate(results: dict[str, Any], size: str, inflight: int) -> float | None:
    rates = [
        _rate(_get(results, size, p.label), inflight) for p in PAIRINGS if p.family == "grpcio"
    ]
    found = [r for r in rates if r is not None]
    return max(found) if found else None


def echo_table(results: dict[str, Any], size: str) -> list[str]:
    grpc_p50 = _p50(_get(results, size, GRPC_AIO))
    go = _get(results, size, GO_GO)
    grpc64 = _best_grpc_rate(results, size, 64)
    lines = [
        f"#### Echo, {size} payload",
        "",
        "p50/p99: one call in flight; calls/s N: N calls in flight on one connection; "
        f"medians over {results['plan'][size]['rounds']} rounds. other CPU: the most CPUs "
        "(of {}) anything else used during a round of the row, kernel threads included "
        "(a noise indicator).".format(results["machine"]["nproc"]),
        "",
        "| client → server | p50 µs | p99 µs | calls/s 1 | calls/s 8 | calls/s 64 "
        "| p50 vs grpcio aio | p50 vs Go | 64 vs best grpcio | 64 vs Go | other CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in PAIRINGS:
        raw = results.get("echo", {}).get(size, {}).get(p.label)
        if raw is None:
            continue
        if "error" in raw:
            lines.append(f"| {p.label} | error: {raw['error'][:60]} ||||||||||")
            continue
        lat = raw.get("latency", {})
        p50 = lat.get("p50_us")
        r64 = _rate(raw, 64)
        lines.append(
            f"| {p.label} | {_num(p50, '{:,.1f}')} | {_num(lat.get('p99_us'), '{:,.1f}')} "
            f"| {_num(_rate(raw, 1))} | {_num(_rate(raw, 8))} | {_num(r64)} "
            f"| {_ratio(p50, grpc_p50)} | {_ratio(p50, _p50(go))} "
            f"| {_ratio(r64, grpc64)} | {_ratio(r64, _rate(go, 64))} "
            f"| {raw.get('foreign_cpu', 0):.2f} |"
        )
    return [*lines, ""]


def streams_table(results: dict[str, Any]) -> list[str]:
    st = results.get("streams")
    if not st:
        return []
    plan = st["plan"]
    go = st.get("go_unary")
    go64 = _rate(go, 64) if go else None
    go1 = _rate(go, 1) if go else None
    pairings = st["pairings"]

    def rate(label: str, kind: str) -> float | None:
        r = pairings.get(label, {}).get(kind)
        return float(r["messages_per_s"]) if r and "error" not in r else None

    lines = [
        f"#### Streams: {plan['count']:,} messages of {plan['size']} B through one stream",
        "",
        f"messages/s, median of {plan['repeats']} streams on one connection. server: "
        "Streaming.Count (the server sends), client: Streaming.Sum (the client sends), "
        "bidi: Streaming.Echo (every message there and back). vs Go unary: against Go ttrpc "
        "1.1.1's Echo calls/s with 64 in flight in this run (it has no streams); vs grpcio: "
        "against grpcio aio's rate for the same kind.",
        "",
        "| client → server | server msg/s | client msg/s | bidi msg/s "
        "| server vs Go unary | client vs Go unary | server vs grpcio | client vs grpcio "
        "| bidi vs grpcio |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label, row in pairings.items():
        cells = []
        for kind in STREAM_KINDS:
            r = row.get(kind)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append(f"error: {r['error'][:40]}")
            else:
                cells.append(_num(r["messages_per_s"]))
        lines.append(
            f"| {label} | {' | '.join(cells)} "
            f"| {_ratio(rate(label, 'server'), go64)} | {_ratio(rate(label, 'client'), go64)} "
            f"| {_ratio(rate(label, 'server'), rate(GRPC_AIO, 'server'))} "
            f"| {_ratio(rate(label, 'client'), rate(GRPC_AIO, 'client'))} "
            f"| {_ratio(rate(label, 'bidi'), rate(GRPC_AIO, 'bidi'))} |"
        )
    if go64 is not None:
        lines += [
            "",
            f"Go ttrpc unary reference (same run, {plan['size']} B Echo, one connection): "
            f"{_num(go64)} calls/s with 64 in flight, {_num(go1)} with 1.",
        ]
    return [*lines, ""]


def memory_table(results: dict[str, Any]) -> list[str]:
    mem = results.get("memory")
    if not mem:
        return []
    lines = [
        f"#### Server memory (KiB), idle and after {mem['calls']:,} calls of 16 B (64 in flight)",
        "",
        "| server | idle RSS | idle PSS | idle private | after RSS | after PSS | after private "
        "| load client | calls/s |",
        "|---|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    for kind, r in mem["servers"].items():
        if "error" in r:
            lines.append(f"| {SERVER_NAMES[kind]} | error: {r['error'][:60]} ||||||||")
            continue
        i, a = r["idle"], r["after"]
        lines.append(
            f"| {SERVER_NAMES[kind]} | {i['rss_kib']:,} | {i['pss_kib']:,} | {i['private_kib']:,} "
            f"| {a['rss_kib']:,} | {a['pss_kib']:,} | {a['private_kib']:,} "
            f"| {r['load_client']} | {r['calls_per_s']:,.0f} |"
        )
    return [*lines, ""]


def import_table(results: dict[str, Any]) -> list[str]:
    imp = results.get("imports")
    if not imp:
        return []
    lines = [
        f"#### Import time (ms; fresh `python -S` each, median of {imp['rounds']})",
        "",
        f"wall = process wall time minus a bare start-up ({imp['bare_ms']:.1f} ms); "
        "in-process = time around the import statement.",
        "",
        "| import | wall | in-process |",
        "|---|--:|--:|",
    ]
    for label, r in imp["modules"].items():
        lines.append(f"| {label} | {r['wall_ms']:.1f} | {r['inprocess_ms']:.1f} |")
    return [*lines, ""]


def size_table(results: dict[str, Any]) -> list[str]:
    s = results.get("sizes")
    if not s:
        return []

    def mib(*names: str) -> str:
        if any(s.get(n) is None for n in names):
            return "-"
        return f"{sum(s[n]['bytes'] for n in names) / MiB:.2f}"

    lines = [
        "#### Installed size (MiB, files incl. .pyc)",
        "",
        "| distribution(s) | MiB |",
        "|---|--:|",
    ]
    for names in (("ttrpc",), ("protobuf",), ("ttrpc", "protobuf"), ("grpcio",),
                  ("grpcio", "protobuf")):  # fmt: skip
        label = " + ".join(f"{n} {s[n]['version']}" if s.get(n) else n for n in names)
        lines.append(f"| {label} | {mib(*names)} |")
    t = s.get("ttrpc")
    if t and len(t.get("packages", {})) > 1:
        for pkg, size in t["packages"].items():
            lines.append(f"| (of which package `{pkg}`) | {size / MiB:.2f} |")
    return [*lines, ""]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    size = size_label(16)
    ours = [p for p in PAIRINGS if p.family == "ttrpc"]

    def add(name: str, measured: str, met: bool | None) -> None:
        out.append({"target": name, "measured": measured, "met": met})

    lat = [(p.label, _p50(_get(results, size, p.label))) for p in ours]
    lat_ok = [(label, v) for label, v in lat if v is not None]
    go = _get(results, size, GO_GO)
    go_p50 = _p50(go)
    if lat_ok and go_p50:
        label, best = min(lat_ok, key=lambda x: x[1])
        add("16 B, 1 in flight: fastest ttrpc pairing p50 <= Go ttrpc p50",
            f"{best:.1f} µs ({label}) vs Go {go_p50:.1f} µs = {best / go_p50:.2f}x",
            best <= go_p50)  # fmt: skip
    else:
        add("16 B, 1 in flight: fastest ttrpc pairing p50 <= Go ttrpc p50", "not measured", None)

    d = _p50(_get(results, size, DEFAULT_PAIRING))
    g = _p50(_get(results, size, GRPC_AIO))
    name = "16 B, 1 in flight: asyncio pairing p50 <= 0.2x grpcio aio p50"
    if d and g:
        add(name, f"{d:.1f} µs vs {g:.1f} µs = {d / g:.2f}x", d <= 0.2 * g)
    else:
        add(name, "not measured", None)

    rates = [(p.label, _rate(_get(results, size, p.label), 64)) for p in ours]
    rates_ok = [(label, v) for label, v in rates if v is not None]
    grpc64 = _best_grpc_rate(results, size, 64)
    go64 = _rate(go, 64)
    default64 = _rate(_get(results, size, DEFAULT_PAIRING), 64)
    best_label, best64 = max(rates_ok, key=lambda x: x[1]) if rates_ok else ("", None)
    name = "16 B, 64 in flight: ttrpc >= 10x grpcio calls/s"
    if best64 and grpc64:
        add(name,
            f"best {best64:,.0f}/s ({best_label}) = {best64 / grpc64:.1f}x best grpcio "
            f"{grpc64:,.0f}/s; asyncio pairing {_ratio(default64, grpc64)}",
            best64 >= 10 * grpc64)  # fmt: skip
    else:
        add(name, "not measured", None)
    name = "16 B, 64 in flight: ttrpc >= 0.5x Go ttrpc calls/s"
    if best64 and go64:
        add(name,
            f"best {best64:,.0f}/s ({best_label}) = {best64 / go64:.2f}x Go {go64:,.0f}/s; "
            f"asyncio pairing {_ratio(default64, go64)}",
            best64 >= 0.5 * go64)  # fmt: skip
    else:
        add(name, "not measured", None)

    servers = results.get("memory", {}).get("servers", {})
    for ours_kind, ref_kind in (("aio", "grpc-aio"), ("uvloop", "grpc-aio"),
                                ("blocking", "grpc-sync")):  # fmt: skip
        name = (
            f"server private memory after calls: {SERVER_NAMES[ours_kind]} "
            f"<= 0.5x {SERVER_NAMES[ref_kind]}"
        )
        a, b = servers.get(ours_kind), servers.get(ref_kind)
        if a and b and "after" in a and "after" in b:
            x, y = a["after"]["private_kib"], b["after"]["private_kib"]
            rx, ry = a["after"]["rss_kib"], b["after"]["rss_kib"]
            add(name,
                f"{x / 1024:.1f} vs {y / 1024:.1f} MiB = {x / y:.2f}x (RSS {rx / ry:.2f}x)",
                x <= 0.5 * y)  # fmt: skip
        elif ours_kind != "uvloop":
            add(name, "not measured", None)

    mods = results.get("imports", {}).get("modules", {})
    for ours_mod, ref_mod in (
        ("ttrpc", "grpc"),
        ("ttrpc.aio", "grpc.aio"),
        ("ttrpc.aio + generated service", "grpc.aio + generated service"),
    ):
        name = f"import {ours_mod} <= 0.5x import {ref_mod} (wall)"
        if ours_mod in mods and ref_mod in mods:
            x, y = mods[ours_mod]["wall_ms"], mods[ref_mod]["wall_ms"]
            xi, yi = mods[ours_mod]["inprocess_ms"], mods[ref_mod]["inprocess_ms"]
            add(name,
                f"{x:.1f} vs {y:.1f} ms = {x / y:.2f}x (in-process {xi:.1f} vs {yi:.1f} ms)",
                x <= 0.5 * y)  # fmt: skip
        else:
            add(name, "not measured", None)

    s = results.get("sizes", {})
    name = "ttrpc + protobuf installed < 3 MiB"
    if s.get("ttrpc") and s.get("protobuf"):
        t = s["ttrpc"]
        lib = t.get("packages", {}).get("ttrpc", t["bytes"])
        total = (lib + s["protobuf"]["bytes"]) / MiB
        extra = ""
        if lib != t["bytes"]:
            whole = (t["bytes"] + s["protobuf"]["bytes"]) / MiB
            extra = f"; whole ttrpc distribution (with {', '.join(t['packages'])}) {whole:.2f} MiB"
        grpc = s["grpcio"]["bytes"] / MiB if s.get("grpcio") else None
        vs = f"; grpcio alone {grpc:.2f} MiB" if grpc else ""
        add(name, f"ttrpc package + protobuf {total:.2f} MiB{extra}{vs}", total < 3)
    else:
        add(name, "not measured", None)
    return out


def target_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["#### Targets", "", "| target | measured | |", "|---|---|---|"]
    for r in rows:
        mark = {True: "met", False: "**missed**", None: "n/a"}[r["met"]]
        lines.append(f"| {r['target']} | {r['measured']} | {mark} |")
    return [*lines, ""]


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = m["versions"]
    lines = [
        f"### Results ({'quick' if results['quick'] else 'full'} run, "
        f"{time.strftime('%Y-%m-%d', time.gmtime(results['started']))})",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + f"; ttrpc from {m['ttrpc_from']}.",
        "",
    ]
    for size in results.get("echo", {}):
        lines += echo_table(results, size)
    lines += streams_table(results)
    lines += memory_table(results)
    lines += import_table(results)
    lines += size_table(results)
    lines += target_table(results["targets"])
    lines += [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


SECTIONS = ("echo", "streams", "memory", "imports", "sizes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--pairing", default="", help="only Echo pairings whose label has this")
    parser.add_argument("--go-bin", help="directory with prebuilt go-server and go-bench")
    parser.add_argument("--no-go", action="store_true", help="skip the Go peers")
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--only takes {SECTIONS}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="ttrpc-bench-"))
    # Every Python child compiles to and loads from one private .pyc cache, so no
    # package pays for compiling its sources (PYTHONDONTWRITEBYTECODE would make
    # sources without a shipped __pycache__, like an editable ttrpc, compile each time).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    use_checkout()
    started = time.time()
    busy0, own0, mono0 = cpu_busy_seconds(), own_cpu_seconds(), time.monotonic()
    try:
        bench = Bench(args, tmp, procs)
        results: dict[str, Any] = {
            "started": started,
            "quick": args.quick,
            "machine": machine_info(),
            "plan": {size_label(s): p for s, p in bench.plan.items()},
        }
        if sections & {"echo", "streams", "memory", "imports"}:
            bench.generate()
        if sections & {"echo", "streams", "memory"}:
            bench.build_go()
        if not bench.have_uvloop:
            bench.notes.append("uvloop not importable: uvloop pairings skipped.")
        if "echo" in sections:
            results["echo"] = bench.echo()
        if "streams" in sections:
            results["streams"] = bench.streams()
        if "memory" in sections:
            results["memory"] = bench.memory()
        if "imports" in sections:
            results["imports"] = bench.imports()
        if "sizes" in sections:
            results["sizes"] = bench.sizes()
        results["targets"] = targets(results)
        results["notes"] = bench.notes
        results["seconds"] = time.time() - started
        # CPU used by other processes while we ran, in CPUs (of nproc): a noise indicator.
        foreign = (cpu_busy_seconds() - busy0) - (own_cpu_seconds() - own0)
        results["foreign_cpu"] = max(0.0, foreign / (time.monotonic() - mono0))
        if results["foreign_cpu"] > 0.1:
            bench.notes.append(
                f"Other processes used {results['foreign_cpu']:.2f} CPUs on average during"
                " the run: expect noise."
            )
        print(report(results))
        print(f"(took {results['seconds']:.0f} s)", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
