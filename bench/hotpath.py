"""Where a call's time goes: py-spy profiles of one Echo pairing, folded into categories.

::

    python bench/hotpath.py CLIENT SERVER [--size 16] [--inflight 1] [--seconds 6]

CLIENT and SERVER are peers.py kinds (``aio``, ``uvloop``, ``blocking``,
``grpc-aio``, ``grpc-sync``) or ``go`` (the Go peers, not profiled: use them to
look at one Python side alone). The client runs one-call-in-flight calls
(``--inflight 1``) or N calls in flight; after a warmup both Python processes
are sampled by py-spy (``pip install py-spy``) for ``--seconds``.

Per process it prints the CPU time per call (from /proc/PID/stat) and py-spy's
samples per call, split by what the innermost Python frame was doing: a socket
call, the event loop, ttrpc's framing, protobuf, thread hand-off... Time inside
C code called from a line (SerializeToString, a syscall, uvloop's loop) is
charged to that line, which is how the categories are told apart. py-spy skips
blocked threads but counts runnable ones: a process preempted right after its
send() woke the peer on the same CPU shows that wait under "socket send", so
the sampled total can exceed the CPU time. ``--sans-io`` instead times ttrpc's
own per-call steps (framing, protobuf, dispatch) in one process, without I/O.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import linecache
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run import (
    PEERS,
    Processes,
    generate_code,
    process_cpu_seconds,
    use_checkout,
    wait_ready,
)

KINDS = ("aio", "uvloop", "blocking", "grpc-aio", "grpc-sync", "go")

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")

# (category, test on the innermost frame's source line), first match wins.
_LINE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("socket recv", re.compile(r"\.recv(_into)?\(")),
    ("socket send", re.compile(r"\.send(all|msg)?\(|transport\.write\(|\.writelines\(")),
    ("poll / epoll", re.compile(r"\bselect\(|\.poll\(|control\(")),
    ("protobuf encode", re.compile(r"SerializeToString\(")),
    ("protobuf decode", re.compile(r"FromString\(|ParseFromString\(")),
    ("lock / thread hand-off", re.compile(r"\.acquire\(|\.release\(|\.notify|\.wait\(|\.put\(")),
)
# (category, test on the innermost frame's file path).
_FILE_RULES: tuple[tuple[str, str], ...] = (
    ("ttrpc framing (protocol.py)", "/ttrpc/protocol.py"),
    ("ttrpc call build/unpack (_calls.py)", "/ttrpc/_calls.py"),
    ("ttrpc dispatch (service.py, context.py)", "/ttrpc/service.py"),
    ("ttrpc dispatch (service.py, context.py)", "/ttrpc/context.py"),
    ("ttrpc asyncio driver", "/ttrpc/aio/"),
    ("ttrpc blocking driver", "/ttrpc/blocking/"),
    ("ttrpc other", "/ttrpc/"),
    ("generated stub", "/interop_"),
    ("uvloop (C loop incl. its syscalls)", "/uvloop/"),
    # Runner.run as the innermost Python frame: inside a C event loop (uvloop).
    ("uvloop (C loop incl. its syscalls)", "/asyncio/runners.py"),
    ("asyncio event loop (Python)", "/asyncio/"),
    ("thread pool / threading", "/threading.py"),
    ("thread pool / threading", "/concurrent/futures/"),
    ("thread pool / threading", "/queue.py"),
    ("grpc", "/grpc/"),
    ("bench harness + handler", "/bench/peers.py"),
)


def classify(leaf: str) -> str:
    m = _FRAME.match(leaf)
    if not m:
        return f"native: {leaf[:40]}"
    path, lineno = m["file"], int(m["line"])
    source = linecache.getline(path, lineno)
    for category, pattern in _LINE_RULES:
        if pattern.search(source):
            return category
    for category, fragment in _FILE_RULES:
        if fragment in path:
            return category
    return "other Python"


def fold(raw: Path) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Samples per category and per innermost frame, from py-spy's raw output."""
    categories: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        categories[classify(leaf)] += int(count)
        leaves[leaf] += int(count)
    return categories, leaves


def sans_io(gen: Path, size: int, seconds: float = 1.0) -> None:
    """Per-call CPU of ttrpc's own steps (no sockets, no event loop), in this process."""
    sys.path.insert(0, str(gen))
    import interop_pb2

    from ttrpc._calls import build_request, unpack_response
    from ttrpc.protocol import ClientConnection, ResponseReceived, ServerConnection
    from ttrpc.service import Method, Service, ServiceRegistry, encode_result

    def echo(request: Any, ctx: Any) -> Any:
        return interop_pb2.EchoResponse(data=request.data, text=request.text, number=request.number)

    registry = ServiceRegistry(asynchronous=False)
    method = Method("Echo", interop_pb2.EchoRequest, interop_pb2.EchoResponse, echo)
    registry.register(Service("ttrpc.interop.v1.Interop", {"Echo": method}))
    request = interop_pb2.EchoRequest(data=b"x" * size)
    client, server = ClientConnection(), ServerConnection()
    state: dict[str, Any] = {}

    def client_encode() -> None:
        wire, _ = build_request("ttrpc.interop.v1.Interop", "Echo", request, None)
        state["sid"], state["req_frame"] = client.send_request(wire)

    def server_decode() -> None:
        (event,) = server.receive_data(state["req_frame"])
        state["sid"] = event.stream_id
        state["call"] = registry.prepare(event.request, None)

    def handler() -> None:
        m, message, ctx = state["call"]
        state["result"] = m.handler(message, ctx)

    def server_encode() -> None:
        payload = encode_result(state["call"][0], state["result"])
        state["resp_frame"] = server.encode_response(state["sid"], payload)

    def client_decode() -> None:
        (event,) = client.receive_data(state["resp_frame"])
        assert isinstance(event, ResponseReceived)
        unpack_response(event.response, interop_pb2.EchoResponse)

    steps = {
        "client: build + encode request": client_encode,
        "server: frame + decode request, dispatch": server_decode,
        "server: handler (bench Echo)": handler,
        "server: encode response": server_encode,
        "client: frame + decode response": client_decode,
    }
    totals = dict.fromkeys(steps, 0)
    clock = time.perf_counter_ns
    n = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop and n < 1_000_000:
        for name, step in steps.items():
            t0 = clock()
            step()
            totals[name] += clock() - t0
        n += 1
    print(f"## ttrpc per-call work without I/O ({size} B, {n:,} calls, this process)\n")
    print("| step | µs/call |\n|---|--:|")
    for name, total in totals.items():
        print(f"| {name} | {total / n / 1e3:.2f} |")
    print(f"| total | {sum(totals.values()) / n / 1e3:.2f} |\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("client", choices=KINDS, nargs="?")
    parser.add_argument("server", choices=KINDS, nargs="?")
    parser.add_argument(
        "--sans-io", action="store_true", help="only time ttrpc's own per-call steps, no I/O"
    )
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=6.0, help="sampling time")
    parser.add_argument("--rate", type=int, default=1000, help="samples per second")
    parser.add_argument("--top", type=int, default=8, help="innermost frames listed")
    parser.add_argument("--go-bin", help="directory with go-server and go-bench")
    args = parser.parse_args(argv)
    if args.sans_io:
        use_checkout()
        with tempfile.TemporaryDirectory(prefix="ttrpc-hotpath-") as tmpdir:
            generate_code(Path(tmpdir) / "gen")
            sans_io(Path(tmpdir) / "gen", args.size)
        return 0
    if args.client is None or args.server is None:
        parser.error("CLIENT and SERVER are required (or --sans-io)")
    if shutil.which("py-spy") is None:
        parser.error("py-spy not found (pip install py-spy)")
    if "go" in (args.client, args.server) and not args.go_bin:
        parser.error("--go-bin DIR is needed for the Go peers (bench/go/build.sh DIR)")

    use_checkout()
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="ttrpc-hotpath-"))
    try:
        gen = tmp / "gen"
        generate_code(gen)
        path = tmp / "s.sock"
        if args.server == "go":
            sargv = [str(Path(args.go_bin) / "go-server"), f"unix://{path}"]
        else:
            sargv = [
                sys.executable,
                str(PEERS),
                "server",
                args.server,
                str(path),
                "--gen",
                str(gen),
            ]
        errlog = tmp / "server.stderr"
        with open(errlog, "wb") as err:
            server = procs.start(sargv, stdout=subprocess.PIPE, stderr=err)
        wait_ready(server, errlog, 30.0)

        run_for = args.seconds + 4.0
        if args.client == "go":
            cargv = [str(Path(args.go_bin) / "go-bench"), "-addr", f"unix://{path}"]
            opt = "-"
        else:
            cargv = [
                sys.executable,
                str(PEERS),
                "client",
                args.client,
                str(path),
                "--gen",
                str(gen),
            ]
            opt = "--"
        cargv += [f"{opt}size", str(args.size), f"{opt}repeats", "1"]
        if args.inflight == 1:
            cargv += [f"{opt}warmup", "500", f"{opt}lat-calls", "100000000",
                      f"{opt}lat-seconds", str(run_for), f"{opt}inflight", ""]  # fmt: skip
        else:
            cargv += [f"{opt}warmup", "0", f"{opt}lat-calls", "0", f"{opt}max-calls",
                      "100000000", f"{opt}inflight", str(args.inflight),
                      f"{opt}duration", str(run_for)]  # fmt: skip
        out = tmp / "client.out"
        with open(out, "wb") as cout:
            client = procs.start(cargv, stdout=cout, stderr=None)
        time.sleep(2.0)

        targets = {"server": (args.server, server.pid), "client": (args.client, client.pid)}
        cpu0 = {role: process_cpu_seconds(pid) for role, (_, pid) in targets.items()}
        t0 = time.monotonic()
        spies = {}
        for role, (kind, pid) in targets.items():
            if kind == "go":
                continue
            spies[role] = procs.start(
                ["py-spy", "record", "-p", str(pid), "-d", str(int(args.seconds)),
                 "-r", str(args.rate), "--nonblocking", "--full-filenames", "-f", "raw",
                 "-o", str(tmp / f"{role}.raw")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for spy in spies.values():
            spy.wait(args.seconds + 30)
        if not spies:
            time.sleep(args.seconds)
        window = time.monotonic() - t0
        cpu = {role: process_cpu_seconds(pid) - cpu0[role] for role, (_, pid) in targets.items()}
        client.wait(run_for + 60)
        result = json.loads(out.read_text().strip().splitlines()[-1])
        if args.inflight == 1:
            rate = 1e6 / result["latency"]["mean_us"]
        else:
            rate = result["throughput"][0]["calls_per_s"]
        calls = rate * int(args.seconds)
        print(
            f"## {args.client} client → {args.server} server, {args.size} B, "
            f"{args.inflight} in flight: {rate:,.0f} calls/s = {1e6 / rate:.1f} µs/call wall"
        )
        for role, (kind, _) in targets.items():
            print(
                f"{role} ({kind}): {cpu[role] / window * 1e6 / rate:.1f} µs CPU per call "
                "(from /proc/PID/stat, py-spy attached)"
            )
        for role, spy in spies.items():
            kind = targets[role][0]
            raw = tmp / f"{role}.raw"
            if spy.returncode != 0 or not raw.exists():
                print(f"\n{role}: py-spy failed")
                continue
            categories, leaves = fold(raw)
            total = sum(categories.values())
            per_call = 1e6 / args.rate / calls
            print(
                f"\n### {role} ({kind}): {total * per_call:.1f} µs per call in running or "
                "runnable threads (py-spy)"
            )
            print("\n| category | µs/call | share |\n|---|--:|--:|")
            for category, n in categories.most_common():
                print(f"| {category} | {n * per_call:.1f} | {n / total:.0%} |")
            print(f"\ntop innermost frames ({role}):")
            for leaf, n in leaves.most_common(args.top):
                print(f"  {n * per_call:6.1f} µs  {leaf.replace(str(Path.cwd()) + '/', '')}")
        print()
    finally:
        procs.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
