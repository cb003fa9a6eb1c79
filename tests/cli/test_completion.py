"""``ttrpc completion``: the scripts parse, and complete what they should in bash (and zsh)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import Cli

# (words on the line, the last one being completed) -> expected completions
CASES = [
    (["ttrpc", ""], "call list describe shims completion -h --help --version"),
    (["ttrpc", "sh"], "shims"),
    (["ttrpc", "call", "-f", ""], "json text"),
    (["ttrpc", "shims", "--format", "j"], "json"),
    (["ttrpc", "completion", "z"], "zsh"),
    (["ttrpc", "list", "containerd.task.v"], "containerd.task.v2.Task containerd.task.v3.Task"),
    (
        ["ttrpc", "call", "-n", "ns", "/run/s", "containerd.task.v2.Task/Sta"],
        "containerd.task.v2.Task/State containerd.task.v2.Task/Start containerd.task.v2.Task/Stats",
    ),
    # bash splits unix:///x at ':' (COMP_WORDBREAKS); the pieces are one address.
    (
        ["ttrpc", "call", "unix", ":", "///x", "containerd.runtime.linux.shim.v1.Shim/Sh"],
        "containerd.runtime.linux.shim.v1.Shim/ShimInfo",
    ),
    (["ttrpc", "call", "unix", ":", "///r"], ""),
    (["ttrpc", "shims", "--na"], "--namespace"),
    (["ttrpc", "call", "--descriptor-set", "x.pb", "--pro"], "--proto --proto-names"),
]


def _driver(script: Path) -> str:
    lines = [
        f"source {shlex.quote(str(script))}",
        'comp() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=();'
        ' _ttrpc; echo "${COMPREPLY[*]}"; }',
    ]
    lines += ["comp " + " ".join(shlex.quote(w) for w in words) for words, _ in CASES]
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash(cli: Cli, tmp_path: Path) -> None:
    res = cli("completion", "bash")
    assert res.code == 0, res.err
    script = tmp_path / "ttrpc.bash"
    script.write_text(res.out)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    out = subprocess.run(
        ["bash", "-c", _driver(script)], capture_output=True, text=True, timeout=30, check=True
    ).stdout.splitlines()
    assert out == [expected for _, expected in CASES]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh")
def test_zsh(cli: Cli, tmp_path: Path) -> None:
    """Through bashcompinit; zsh filters by the typed prefix itself, so compare filtered."""
    res = cli("completion", "zsh")
    assert res.code == 0, res.err
    script = tmp_path / "_ttrpc.zsh"
    script.write_text(res.out)
    run = subprocess.run(
        ["zsh", "-f", "-c", "autoload -U compinit && compinit -u\n" + _driver(script)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for (words, expected), line in zip(CASES, run.stdout.splitlines(), strict=True):
        got = [w for w in line.split() if w.startswith(words[-1])]
        assert got == expected.split(), (words, run.stderr)
