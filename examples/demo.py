"""The README's demo: an asyncio ttrpc server in one process, a blocking client in this one.

    python examples/demo.py

Everything goes over a real unix socket (mode 0600) in a temporary directory;
the script prints each call and what came back, and exits non-zero if
anything behaves unexpectedly.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kvstore_pb2 as kv
from kvstore_ttrpc import KeyValueStoreBlockingClient

import ttrpc.blocking
from ttrpc import Code, Context, RpcError


def show(what: str, outcome: object) -> None:
    print(f"  {what:<52} -> {outcome}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ttrpc-demo-") as tmp:
        address = f"unix://{tmp}/kv.sock"
        here = os.path.dirname(os.path.abspath(__file__))
        server = subprocess.Popen(
            [sys.executable, os.path.join(here, "kv_server.py"), address],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "READY":
                print("server did not start", file=sys.stderr)
                return 1
            mode = stat.S_IMODE(os.stat(f"{tmp}/kv.sock").st_mode)
            print(f"server pid {server.pid} listening on {address} (mode {mode:o})")
            run_client(address)
        finally:
            server.terminate()
            out, _ = server.communicate(timeout=10)
            print(out.strip())
        return server.returncode


def run_client(address: str) -> None:
    conn = ttrpc.blocking.connect(address, timeout=5)
    store = KeyValueStoreBlockingClient(conn)
    print("blocking client connected; calls:")

    r = store.Put(kv.PutRequest(key="greeting", value=b"hello, ttrpc"))
    show("Put greeting", f"replaced={r.replaced}")
    r = store.Put(kv.PutRequest(key="greeting", value=b"hello again"))
    show("Put greeting (again)", f"replaced={r.replaced}")
    show("Get greeting", store.Get(kv.GetRequest(key="greeting")).value)

    for what, call, want in [
        ("Get missing", lambda: store.Get(kv.GetRequest(key="missing")), Code.NOT_FOUND),
        ("Put with an empty key", lambda: store.Put(kv.PutRequest()), Code.INVALID_ARGUMENT),
        (
            "Compact 3s with a 0.25s deadline",
            lambda: store.Compact(kv.CompactRequest(seconds=3), Context(timeout=0.25)),
            Code.DEADLINE_EXCEEDED,
        ),
        (
            "Put over the 4 MiB message limit",
            lambda: store.Put(kv.PutRequest(key="big", value=b"x" * (5 << 20))),
            Code.RESOURCE_EXHAUSTED,
        ),
    ]:
        start = time.monotonic()
        try:
            call()
        except RpcError as exc:
            assert exc.code == want, exc
            show(what, f"{exc} ({(time.monotonic() - start) * 1000:.0f} ms)")
        else:
            raise AssertionError(f"{what}: no error")

    r = store.Compact(kv.CompactRequest(seconds=0.05), Context(timeout=2))
    show("Compact 0.05s with a 2s deadline", f"keys={r.keys}")

    who = store.WhoAmI(
        kv.WhoAmIRequest(),
        Context(timeout=30, metadata={"X-Request-Id": "demo-1", "tags": ["a", "b"]}),
    )
    show(
        "WhoAmI with metadata",
        f"metadata={dict(who.metadata)} deadline={who.deadline_seconds:.1f}s "
        f"pid={who.pid} uid={who.uid} (my pid {os.getpid()})",
    )

    # Many threads share the one connection; calls are multiplexed by stream id.
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(50):
                store.Put(kv.PutRequest(key=f"t{n}-{i}", value=b"v"))
        except BaseException as exc:
            errors.append(exc)

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    elapsed = time.monotonic() - start
    keys = store.Compact(kv.CompactRequest()).keys
    show("8 threads x 50 Puts on one connection", f"{keys} keys, {400 / elapsed:.0f} calls/s")

    conn.close()
    try:
        store.Get(kv.GetRequest(key="greeting"))
    except RpcError as exc:
        show("Get after close", exc)


if __name__ == "__main__":
    sys.exit(main())
