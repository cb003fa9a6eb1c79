"""Soak: a million calls against one server, watching for leaks.

    python bench/soak.py [--calls 1000000] [--server aio|uvloop|blocking] [--threads 8]

Starts a ttrpc Echo server (bench/peers.py) in its own process and drives it
from this process with the blocking client on one connection (``--threads``
callers), plus a fresh connection every 1,000 calls (connection churn). Every
``--every`` calls it samples the server's and the client's open file
descriptors, threads and memory (RSS, PSS, private from smaps_rollup).
Prints the samples and the drift between the first sample after warm-up and
the last. Bounded by ``--calls`` and ``--seconds``; reports, never asserts.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests" / "interop")]

import interop_pb2  # noqa: E402
from interop_ttrpc import InteropBlockingClient  # noqa: E402

import ttrpc.blocking  # noqa: E402


def sample(pid: int) -> dict[str, float]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    mem: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":"):
                mem[parts[0][:-1]] = int(parts[1])
    return {
        "fds": fds,
        "threads": threads,
        "rss": mem.get("Rss", 0) / 1024,
        "pss": mem.get("Pss", 0) / 1024,
        "private": (mem.get("Private_Clean", 0) + mem.get("Private_Dirty", 0)) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000)
    parser.add_argument("--server", default="aio", choices=("aio", "uvloop", "blocking"))
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=900)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="soak-", dir="/tmp")
    path = os.path.join(tmp, "s.sock")
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO / 'tests' / 'interop'}")
    server = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "bench" / "peers.py"),
            "server",
            args.server,
            path,
            "--gen",
            str(REPO / "tests" / "interop"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "READY":
            print("server did not start", file=sys.stderr)
            return 1
        conn = ttrpc.blocking.connect(path, timeout=5)
        client = InteropBlockingClient(conn)
        done = 0
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds
        rows: list[tuple[int, float, dict[str, float], dict[str, float]]] = []
        start = time.monotonic()
        request = interop_pb2.EchoRequest(data=b"x" * 16)
        next_sample = [args.every]
        stop = threading.Event()

        def worker() -> None:
            nonlocal done
            while not stop.is_set():
                client.Echo(request)
                with lock:
                    done += 1
                    if done >= args.calls or time.monotonic() > deadline:
                        stop.set()
                    if done >= next_sample[0]:
                        next_sample[0] += args.every
                        rows.append(
                            (
                                done,
                                time.monotonic() - start,
                                sample(server.pid),
                                sample(os.getpid()),
                            )
                        )
                    churn = done % 1000 == 0
                if churn:  # a short-lived extra connection, to catch per-connection leaks
                    with ttrpc.blocking.connect(path, timeout=5) as extra:
                        InteropBlockingClient(extra).Echo(request)

        threads = [threading.Thread(target=worker) for _ in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()

    print(f"soak: {done:,} calls, server {args.server}, {args.threads} client threads\n")
    print(
        "| calls | s | calls/s | server fds | server threads | server RSS | server private "
        "| client fds | client threads | client RSS |"
    )
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for n, t, s, c in rows:
        print(
            f"| {n:,} | {t:.0f} | {n / t:,.0f} | {s['fds']:.0f} | {s['threads']:.0f} "
            f"| {s['rss']:.1f} MiB | {s['private']:.1f} MiB | {c['fds']:.0f} "
            f"| {c['threads']:.0f} | {c['rss']:.1f} MiB |"
        )
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        print(
            f"\ndrift from {first[0]:,} to {last[0]:,} calls: server fds "
            f"{last[2]['fds'] - first[2]['fds']:+.0f}, threads "
            f"{last[2]['threads'] - first[2]['threads']:+.0f}, RSS "
            f"{last[2]['rss'] - first[2]['rss']:+.2f} MiB; client fds "
            f"{last[3]['fds'] - first[3]['fds']:+.0f}, "
            f"RSS {last[3]['rss'] - first[3]['rss']:+.2f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
