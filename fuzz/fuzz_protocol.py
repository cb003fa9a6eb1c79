"""Coverage-guided fuzzing of the sans-I/O core with atheris.

    python fuzz/fuzz_protocol.py -atheris_runs=1000000 [corpus_dir]

Each input is split into chunks (the first bytes choose the split points)
and fed to a server-side and a client-side connection. Any exception other
than the protocol's own is a crash; so is a reader that buffers more than
one frame's worth of bytes.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inputs import split

with atheris.instrument_imports():
    from ttrpc.protocol import HEADER_LENGTH, ClientConnection, ServerConnection
    from ttrpc.ttrpc_pb2 import Request

LIMIT = 4096


def test_one_input(data: bytes) -> None:
    server = ServerConnection(max_message_length=LIMIT)
    client = ClientConnection(max_message_length=LIMIT)
    # Pending calls, so that response frames for ids 1, 3, 5 are matched.
    for _ in range(3):
        client.send_request(Request(service="s", method="m"))
    for piece in split(data):
        server.receive_data(piece)
        server.data_to_send()
        client.receive_data(piece)
        assert server.reader.buffered <= HEADER_LENGTH + LIMIT, "server buffered too much"
        assert client.reader.buffered <= HEADER_LENGTH + LIMIT, "client buffered too much"


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
