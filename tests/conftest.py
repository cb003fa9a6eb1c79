"""Shared fixtures: short socket paths (AF_UNIX paths are limited to 107 bytes)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def address(sock_dir: str) -> str:
    return "unix://" + os.path.join(sock_dir, "s.sock")
