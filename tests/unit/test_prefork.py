"""containerd_shim.prefork: the zygote's memory shaping, run on the shims' interpreter.

The steps only do something on CPython 3.12+ (immortal objects), which is what the
shims run on where the machine has it (scripts/setup, build/shim-python); each test
runs its script there, in a fresh process, since the steps change the interpreter's
state for good.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.containerd import shim_python

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def python312() -> str:
    python = shim_python()
    out = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info >= (3, 12))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    if out.stdout.strip() != "True":
        if os.environ.get("CI"):
            pytest.fail(f"the shims' interpreter {python} is older than 3.12 (scripts/setup)")
        pytest.skip(f"{python} is older than 3.12: the steps do nothing there")
    return python


def run(python: str, script: str, tmp_path: Path | None = None) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(tmp_path or "")]))
    res = subprocess.run(
        [python, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env, timeout=50
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_immortal_objects_keep_working_and_their_counts_stay_put(python312: str) -> None:
    out = run(
        python312,
        """
        import gc, os, sys
        from containerd_shim import prefork

        class Box:
            def __init__(self, v): self.v = v
        table = {"a": [1, 2, 3], "b": Box(5)}
        count = prefork.immortalize()
        assert count > 1000, count
        before = sys.getrefcount(table)
        many = [table] * 1000
        assert sys.getrefcount(table) == before  # no write to the object for a reference
        del many
        table["c"] = Box(7)  # still mutable, and what is made now is mortal
        fresh = table["c"]
        n = sys.getrefcount(fresh)
        more = [fresh] * 10
        assert sys.getrefcount(fresh) == n + 10
        assert table["b"].v == 5 and sum(table["a"]) == 6
        gc.collect()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if table["b"].v == 5 and Box(1).v == 1 else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        print("ok")
    """,
    )
    assert out.strip() == "ok"


def test_packed_functions_run_the_same_code_from_copies_side_by_side(
    python312: str, tmp_path: Path
) -> None:
    body = "\n".join(
        f"def f{i}(x):\n    total = 0\n"
        + "".join(f"    total += x * {j}\n" for j in range(40))
        + f"    return total + {i}\n"
        for i in range(30)
    )
    body += textwrap.dedent("""
        def outer(n):
            def inner(m):
                return m + n
            return inner

        class K:
            def method(self, x):
                return [x * i for i in range(3)]
    """)
    (tmp_path / "hotmod.py").write_text(body)
    out = run(
        python312,
        """
        import sys
        from containerd_shim import prefork
        import hotmod

        keys = [f"hotmod.py:f{i}" for i in range(30)]
        keys += ["hotmod.py:outer", "hotmod.py:outer.<locals>.inner", "hotmod.py:K.method"]
        old = {k: getattr(hotmod, k).__code__ for k in ("f0", "f29", "outer")}
        expected = [getattr(hotmod, f"f{i}")(3) for i in range(30)]
        assert prefork.pack_code(keys) == 33
        assert all(getattr(hotmod, k).__code__ is not c for k, c in old.items())
        assert all(getattr(hotmod, k).__code__ == c for k, c in old.items())  # same code
        assert [getattr(hotmod, f"f{i}")(3) for i in range(30)] == expected
        inner = hotmod.outer(10)
        assert inner(5) == 15
        packed_inner = [c for c in hotmod.outer.__code__.co_consts if hasattr(c, "co_code")]
        assert inner.__code__ is packed_inner[0]
        assert hotmod.K().method(2) == [0, 2, 4]
        codes = [getattr(hotmod, f"f{i}").__code__ for i in range(30)]
        sizes = [sys.getsizeof(c) for c in codes]
        span = max(id(c) + s for c, s in zip(codes, sizes)) - min(id(c) for c in codes)
        assert min(sizes) > 512  # these come from malloc, one after another
        print(span, sum(sizes))
    """,
        tmp_path,
    )
    span, total = map(int, out.split())
    assert span < 2 * total, f"copies spread over {span} bytes for {total} bytes of code"


def test_packed_functions_keep_their_versions_and_specialised_calls_stay_right(
    python312: str, tmp_path: Path
) -> None:
    (tmp_path / "vermod.py").write_text(
        "def add(x):\n    return x + 1\n\n"
        "def loop(n):\n    t = 0\n    for i in range(n):\n        t += add(i)\n    return t\n"
    )
    out = run(
        python312,
        """
        import ctypes
        from containerd_shim import prefork
        import vermod

        version = prefork._function_version_field()
        assert version is not None  # the layout check passes on CPython 3.12
        before = version(vermod.add).value
        assert before != 0
        assert vermod.loop(100) == 5050  # call sites specialised on add's version
        prefork.pack_code(["vermod.py:add", "vermod.py:loop"])
        assert version(vermod.add).value == before  # kept, not cleared by the copy
        assert vermod.loop(100) == 5050
        vermod.add.__code__ = (lambda x: x + 2).__code__  # a real change still deopts
        assert version(vermod.add).value != before
        assert vermod.loop(100) == 5150
        print("ok")
    """,
        tmp_path,
    )
    assert out.strip() == "ok"


def test_sealed_free_space_is_gone(python312: str) -> None:
    out = run(
        python312,
        """
        import json
        from containerd_shim import prefork, zygote

        zygote._preload()
        def free():
            heap = sum(s for s in prefork._heap_free_chunks()[0] if s < 65536)
            return heap, prefork._obmalloc_free_blocks()
        before = free()
        prefork.seal_free_space()
        print(json.dumps([before, free()]))
    """,
    )
    (heap_before, blocks_before), (heap_after, blocks_after) = json.loads(out)
    assert heap_before > 16 * 1024  # a preloaded zygote has holes
    assert heap_after < min(heap_before, 64 * 1024), (heap_before, heap_after)
    # obmalloc: what is left free in each size class fits in one pool (16 KiB), the one
    # being filled, where a child's next blocks come side by side.
    pool = 16 * 1024
    assert sum(int(size) * n for size, n in blocks_before.items()) > pool, blocks_before
    assert all(int(size) * n <= pool for size, n in blocks_after.items()), blocks_after


def test_recorded_code_is_each_function_once_in_first_run_order(
    python312: str, tmp_path: Path
) -> None:
    (tmp_path / "recmod.py").write_text("def a():\n    return b()\n\ndef b():\n    return 1\n")
    record = tmp_path / "record.txt"
    run(
        python312,
        f"""
        from containerd_shim import prefork
        import recmod
        prefork.record_code({str(record)!r})
        prefork.record_code({str(record)!r})  # a second call: still one recording
        recmod.b(); recmod.a(); recmod.a()
    """,
        tmp_path,
    )
    lines = [line for line in record.read_text().splitlines() if line.startswith("recmod.py:")]
    assert lines == ["recmod.py:b", "recmod.py:a"]
    # A record that cannot be written (its directory gone) never breaks the process.
    out = run(
        python312,
        f"""
        from containerd_shim import prefork
        import recmod
        prefork.record_code({str(tmp_path / "gone" / "record.txt")!r})
        print(recmod.a())
    """,
        tmp_path,
    )
    assert out.strip() == "1"


def test_hot_code_list_names_the_zygotes_functions(python312: str) -> None:
    """A stale list only costs memory; regenerate it with scripts/hotcode."""
    from containerd_shim import prefork

    keys = prefork.load_hot_code()
    assert len(keys) > 200
    out = run(
        python312,
        """
        from containerd_shim import prefork, zygote
        zygote._preload()
        print("\\n".join(prefork.known_keys()))
    """,
    )
    known = set(out.splitlines())
    missing = [k for k in keys if k not in known]
    assert len(missing) <= len(keys) // 10, f"stale hot-code list, run scripts/hotcode: {missing}"


def test_shaping_a_zygote_changes_nothing_it_runs(python312: str) -> None:
    out = run(
        python312,
        """
        import json, os
        from containerd_shim import prefork, zygote
        from containerd_shim.api.runtime.v2.task import shim_pb2
        zygote._preload()
        prefork.shape()
        pid = os.fork()
        if pid == 0:
            req = shim_pb2.CreateTaskRequest(id="c1", bundle="/b", terminal=False)
            back = shim_pb2.CreateTaskRequest.FromString(req.SerializeToString())
            ok = back.id == "c1" and json.loads(json.dumps({"a": [1]})) == {"a": [1]}
            os._exit(0 if ok else 1)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """,
    )
    assert out.strip() == "0"


def test_before_312_shaping_does_nothing() -> None:
    if sys.version_info >= (3, 12):
        pytest.skip("this interpreter has immortal objects")
    from containerd_shim import prefork

    probe = object()
    count = sys.getrefcount(probe)
    prefork.shape()
    assert prefork.immortalize() == 0
    holders = [probe] * 3
    assert sys.getrefcount(probe) == count + len(holders)
