"""A server in a child process (``serve.py``) and what tests read about it from /proc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

SERVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[str], log_path: str) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._log_path = log_path

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def rss(self) -> int:
        """Resident memory, in bytes (from /proc/PID/smaps_rollup)."""
        with open(f"/proc/{self.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
        raise KeyError("Rss")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return self._status("Threads")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        with open(self._log_path) as f:
            return f.read()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling an external process's state: nothing to wait on


@contextmanager
def server_process(
    kind: str, address: str, nofile: int | None = None, **options: Any
) -> Iterator[ServerProcess]:
    with tempfile.NamedTemporaryFile("w+", prefix="ttrpc-server-", suffix=".log") as log:
        argv = [sys.executable, SERVE, kind, address, "--options", json.dumps(options)]
        if nofile is not None:
            argv += ["--nofile", str(nofile)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout is not None
        try:
            line = proc.stdout.readline().strip()
            server = ServerProcess(proc, log.name)
            assert line == "READY", f"server did not start: {line!r}\n{server.log()}"
            yield server
            assert server.alive(), f"server died: {proc.returncode}\n{server.log()}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            proc.stdout.close()
        log.seek(0)
        assert proc.returncode == 0, f"server exited {proc.returncode}\n{log.read()}"
