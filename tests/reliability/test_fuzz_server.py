"""The live-server fuzz target (fuzz/fuzz_server.py), run over its seed corpus in CI.

atheris is not needed: the per-input function is plain Python. The campaign
itself (a million inputs and more) is recorded in docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import pytest

FUZZ_SERVER = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "fuzz", "fuzz_server.py"
)
KINDS = ["aio", "blocking"]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, FUZZ_SERVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def target() -> Iterator[ModuleType]:
    module = load("fuzz_server")
    try:
        yield module
    finally:
        module.close()


@pytest.mark.parametrize("kind", KINDS)
def test_seed_corpus(target: ModuleType, kind: str) -> None:
    seeds = target.seeds()
    assert len(seeds) >= 15
    for seed in seeds:
        target.test_one_input(seed, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_cut_and_shifted_seeds(target: ModuleType, kind: str) -> None:
    """Each seed cut short at several places, and fed in other pieces (first byte)."""
    count = 0
    for seed in target.seeds():
        for cut in range(2, len(seed), max(1, len(seed) // 6)):
            target.test_one_input(seed[:cut] + seed[-1:], kind)
            count += 1
        for first in (1, 3, 7):
            target.test_one_input(bytes([first]) + seed[1:], kind)
            count += 1
    assert count > 100


def test_the_target_catches_a_server_that_raises(
    target: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not vacuous: an exception escaping the server's read path fails the input."""
    import ttrpc.aio.server

    seed = target.seeds()[0]
    target.test_one_input(seed, "aio")

    def broken(self: object, event: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ttrpc.aio.server._Connection, "_start", broken)
    monkeypatch.setattr(target, "DEADLINE", 0.5)  # the follow-up call is never answered
    with pytest.raises(AssertionError):
        target.test_one_input(seed, "aio")


def test_the_target_catches_a_wrong_answer(
    target: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ttrpc.blocking.server
    from ttrpc.status import Code
    from ttrpc.ttrpc_pb2 import Status

    def wrong(self: object, stream_id: int, payload: bytes) -> bytes:
        return ttrpc.protocol.ServerConnection.encode_error(
            self,  # type: ignore[arg-type]
            stream_id,
            Status(code=Code.INTERNAL, message="wrong"),
        )

    monkeypatch.setattr(ttrpc.blocking.server.ServerConnection, "encode_response", wrong)
    with pytest.raises(AssertionError, match="code: 13"):
        target.test_one_input(target.seeds()[0], "blocking")
