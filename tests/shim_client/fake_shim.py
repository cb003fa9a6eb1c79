"""A stand-in v1 "shim" for client tests: answers ShimInfo on fd 3, ignores SIGTERM.

python tests/shim_client/fake_shim.py  [v1 flags, ignored]
"""

from __future__ import annotations

import os
import signal
import socket
import threading

from google.protobuf.empty_pb2 import Empty

import ttrpc
import ttrpc.blocking
from containerd_shim.api.runtime.v1.shim.v1.shim_pb2 import ShimInfoResponse
from containerd_shim.api.runtime.v1.shim.v1.shim_ttrpc import ShimBlockingService


class Fake(ShimBlockingService):
    def ShimInfo(self, request: Empty, ctx: ttrpc.Context | None = None) -> ShimInfoResponse:
        return ShimInfoResponse(shim_pid=os.getpid())


def main() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    server = ttrpc.blocking.Server(handshake=ttrpc.require_same_user())
    server.register(Fake())
    server.start(socket.socket(fileno=3))
    threading.Event().wait()


if __name__ == "__main__":
    main()
