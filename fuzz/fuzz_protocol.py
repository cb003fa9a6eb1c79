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

with atheris.instrument_imports():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from ttrpc.protocol import HEADER_LENGTH, ClientConnection, ServerConnection
    from ttrpc.ttrpc_pb2 import Request

LIMIT = 4096


def split(data: bytes) -> list[bytes]:
    """Cut the input into pieces whose sizes come from its first bytes."""
    if len(data) < 2:
        return [data]
    cuts = data[0] % 8 + 1
    sizes = list(data[1 : 1 + cuts])
    body = data[1 + cuts :]
    pieces = []
    pos = 0
    for size in sizes:
        pieces.append(body[pos : pos + size + 1])
        pos += size + 1
    pieces.append(body[pos:])
    return pieces


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
