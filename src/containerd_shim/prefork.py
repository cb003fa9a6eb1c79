"""Shape the zygote's memory so that forked shims copy as few pages as possible.

A forked shim shares the zygote's pages until it writes to them; each write
costs a private 4 KiB copy. CPython writes where a C program would only
read, and each of these steps takes away one kind of write:

* :func:`immortalize` (CPython 3.12+): every object alive before the fork gets
  the immortal reference count, which ``Py_INCREF``/``Py_DECREF`` leave alone
  (PEP 683). On 3.11 reference counting copies most of the pages a shim
  touches, and this does nothing.
* :func:`pack_code`: the interpreter writes into the code objects it runs
  (warm-up counters and specialised instructions live in the bytecode), and a
  shim runs a few hundred functions scattered over megabytes of imported
  code. Fresh copies of the functions a shim runs (a list recorded from real
  shims, :data:`HOT_CODE`), made one after another, put them on a few pages.
* :func:`assign_type_versions`: types get their attribute-cache version on
  first lookup, a write into the type; done here, it is done once.
* :func:`seal_free_space`: a forked shim's allocations would land in the free
  blocks scattered over the zygote's heaps, a page copied for each. The
  zygote takes them itself (they are its memory already), so a shim allocates
  from fresh pages, side by side.

Each is measured in docs/benchmarks.md. None changes what the code does: a
packed function runs the same bytecode; an immortal object only never dies,
and everything here lives as long as the zygote anyway.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes
    from collections.abc import Callable

__all__ = [
    "HOT_CODE", "STEPS", "assign_dict_versions", "assign_type_versions", "code_key",
    "immortalize", "known_keys", "load_hot_code", "pack_code", "record_code",
    "seal_free_space", "shape",
]  # fmt: skip

STEPS = ("seal", "pack", "types", "immortal")
HOT_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hotcode.txt")

_IMMORTAL_REFCNT = 0xFFFFFFFF  # CPython 3.12+'s _Py_IMMORTAL_REFCNT on 64-bit builds


def _roots() -> list[str]:
    return sorted({os.path.abspath(p) for p in sys.path if p}, key=len, reverse=True)


def code_key(code: types.CodeType, roots: list[str] | None = None) -> str:
    """Where ``code`` comes from, independent of where it is installed:
    ``path/relative/to/its/sys.path/entry.py:qualname``."""
    filename = code.co_filename
    for root in roots if roots is not None else _roots():
        if filename.startswith(root + os.sep):
            filename = filename[len(root) + 1 :]
            break
    return f"{filename}:{getattr(code, 'co_qualname', code.co_name)}"  # 3.11+


def _code_referents(code: types.CodeType) -> list[object]:
    # Code objects have no tp_traverse: gc.get_referents() sees nothing in them.
    return [
        code.co_consts, code.co_names, code.co_varnames, code.co_cellvars, code.co_freevars,
        code.co_filename, code.co_name, code.co_linetable,
        getattr(code, "co_qualname", None), getattr(code, "co_exceptiontable", None),  # 3.11+
    ]  # fmt: skip


def immortalize() -> int:
    """Give every live object the immortal reference count; how many (0 before 3.12)."""
    if sys.version_info < (3, 12) or sys.maxsize < 2**32:
        return 0
    import ctypes

    refcount = ctypes.c_ssize_t.from_address
    count = 0
    # The reference count is the mark: no set of a hundred thousand ids to allocate
    # (and free again, leaving holes) in the middle of the zygote's heap.
    stack = gc.get_objects()
    refcount(id(stack)).value = _IMMORTAL_REFCNT  # not itself: it dies here
    while stack:
        obj = stack.pop()
        cell = refcount(id(obj))
        if cell.value == _IMMORTAL_REFCNT:
            continue
        cell.value = _IMMORTAL_REFCNT
        count += 1
        stack += gc.get_referents(obj)
        if type(obj) is types.CodeType:
            stack += _code_referents(obj)
    refcount(id(stack)).value = 1
    return count


def _functions_and_code() -> tuple[list[types.FunctionType], list[types.CodeType]]:
    """Every function object, and every code object they run (nested ones too)."""
    functions = [o for o in gc.get_objects() if type(o) is types.FunctionType]
    codes: dict[int, types.CodeType] = {}
    stack = [f.__code__ for f in functions]
    while stack:
        code = stack.pop()
        if id(code) not in codes:
            codes[id(code)] = code
            stack += [c for c in code.co_consts if type(c) is types.CodeType]
    return functions, list(codes.values())


def known_keys() -> set[str]:
    """The keys of the code of every function this process has (what :func:`pack_code`
    can find)."""
    roots = _roots()
    return {code_key(c, roots) for c in _functions_and_code()[1]}


def pack_code(keys: list[str]) -> int:
    """Give the functions whose code ``keys`` name fresh copies of it, allocated in
    the keys' order; how many code objects were copied."""
    if not keys:
        return 0
    order = {key: i for i, key in enumerate(keys)}
    roots = _roots()
    functions, codes = _functions_and_code()
    hot = sorted(
        (c for c in codes if code_key(c, roots) in order),
        key=lambda c: order[code_key(c, roots)],
    )
    # Everything the copying needs is allocated first, and the free space sealed, so
    # the copies come one after another from fresh memory.
    index = {id(c): i for i, c in enumerate(hot)}
    copies: list[types.CodeType | None] = [None] * len(hot)
    seal_free_space()

    def copy(i: int) -> types.CodeType:
        done = copies[i]
        if done is not None:
            return done
        code = hot[i]
        consts = tuple(
            copy(index[id(c)]) if type(c) is types.CodeType and id(c) in index else c
            for c in code.co_consts
        )
        new = code.replace(co_consts=consts)  # a new object, fresh (unspecialised) bytecode
        copies[i] = new
        return new

    for i in range(len(hot)):
        copy(i)
    # Assigning __code__ clears the function's version, which the interpreter would assign
    # again at the first call it specialises in each child: a write into every packed
    # function. The old version stays right: 3.12 versions a function by its code, and
    # the copy is the same code.
    version_of = _function_version_field()
    for f in functions:
        at = index.get(id(f.__code__))
        if at is not None:
            version = version_of(f).value if version_of else 0
            f.__code__ = copy(at)
            if version_of and version:
                version_of(f).value = version
    return len(hot)


# CPython 3.12's PyFunctionObject on 64-bit builds: where vectorcall and func_version lie.
_VECTORCALL_AT = 128
_FUNC_VERSION_AT = 136


def _function_version_field() -> Callable[[types.FunctionType], ctypes.c_uint32] | None:
    """The ``func_version`` field of a function (CPython 3.12), or None where the layout
    is not the one checked here: a new function's vectorcall is
    ``_PyFunction_Vectorcall`` and its version non-zero, and assigning ``__code__``
    clears that version."""
    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 12):
        return None
    if sys.maxsize < 2**32:
        return None
    import ctypes

    vectorcall = ctypes.cast(ctypes.pythonapi._PyFunction_Vectorcall, ctypes.c_void_p).value

    def field(f: types.FunctionType) -> ctypes.c_uint32:
        return ctypes.c_uint32.from_address(id(f) + _FUNC_VERSION_AT)

    def probe() -> None:
        pass

    if ctypes.c_void_p.from_address(id(probe) + _VECTORCALL_AT).value != vectorcall:
        return None
    if field(probe).value == 0:
        return None
    probe.__code__ = probe.__code__.replace()
    if field(probe).value != 0:
        return None
    return field


_PROBE = compile("def probe():\n    for _ in range(8):\n        __name__\n", "<prefork>", "exec")


def assign_dict_versions() -> int:
    """Run a global-name lookup a few times in every module: the specialising interpreter
    then gives the module's namespace (and the builtins) the version its caches check,
    a write into the dictionary's keys that every forked shim would otherwise make."""
    code = next(c for c in _PROBE.co_consts if isinstance(c, types.CodeType))
    modules = [
        m for m in list(sys.modules.values()) if isinstance(getattr(m, "__dict__", None), dict)
    ]
    for module in modules:
        if "__name__" in module.__dict__:
            types.FunctionType(code, module.__dict__)()
    return len(modules)


def _all_types() -> list[type]:
    found: dict[int, type] = {}
    stack: list[type] = [object]
    while stack:
        cls = stack.pop()
        if id(cls) not in found:
            found[id(cls)] = cls
            stack += type.__subclasses__(cls)
    return list(found.values())


def assign_type_versions() -> int:
    """Look up a missing attribute on every class, built-in ones too: CPython then gives
    it (and its bases) the version tag of its attribute cache. How many classes."""
    types_ = _all_types()
    for cls in types_:
        with contextlib.suppress(Exception):  # a metaclass with a __getattr__ of its own
            getattr(cls, "__pyrunc_no_such_attribute__", None)
    return len(types_)


def _obmalloc_free_blocks() -> dict[int, int]:
    """Free blocks in obmalloc's partly used pools: {block size: count}."""
    # Into a pipe (the report is a few KiB): tempfile would import half the standard library.
    reader, writer = os.pipe()
    saved = os.dup(2)
    try:
        sys.stderr.flush()
        os.dup2(writer, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(writer)
    with os.fdopen(reader, "rb") as out:
        text = out.read().decode(errors="replace")
    free: dict[int, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 5 and all(f.isdigit() for f in fields):
            size, avail = int(fields[1]), int(fields[4])
            if avail:
                free[size] = avail
        elif free and not fields:
            break  # the table ends with a blank line
    return free


def _heap_free_chunks() -> tuple[list[int], int]:
    """Sizes of the free chunks on glibc's main heap (chunks in tcache and fastbins look
    used and are not here), and where its top chunk starts."""
    import ctypes
    import struct

    with open("/proc/self/maps") as f:
        heap = [line.split()[0] for line in f if line.rstrip().endswith("[heap]")]
    if not heap:
        return [], 0
    start, end = (int(x, 16) for x in heap[0].split("-"))
    mem = ctypes.string_at(start, end - start)
    sizes: list[int] = []
    at = 0
    while at + 32 <= len(mem):
        size = struct.unpack_from("Q", mem, at + 8)[0] & ~7
        following = at + size
        if size < 32 or following + 16 > len(mem):
            break  # the top chunk (or something we do not understand: stop)
        if not struct.unpack_from("Q", mem, following + 8)[0] & 1:
            sizes.append(size)
        at = following
    return sizes, start + at


def seal_free_space() -> None:
    """Allocate (and keep) the free blocks of obmalloc's pools and of glibc's heap, so a
    forked child allocates from fresh pages instead of scattering over shared ones."""
    import ctypes

    if sys.version_info < (3, 12) or not sys.platform.startswith("linux"):
        return
    pymalloc = ctypes.pythonapi.PyObject_Malloc
    pymalloc.restype = ctypes.c_void_p
    pymalloc.argtypes = [ctypes.c_size_t]
    for size, count in _obmalloc_free_blocks().items():
        for _ in range(count):
            pymalloc(size)
    # The heap last: what finding obmalloc's free blocks freed there is taken too.
    libc = ctypes.CDLL(None)
    malloc = libc.malloc
    malloc.restype = ctypes.c_void_p
    malloc.argtypes = [ctypes.c_size_t]
    # Above the mmap threshold malloc would map new memory instead of taking a chunk.
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    top = 0
    for _ in range(4):  # taking a chunk can split another: until none is left
        sizes, top = _heap_free_chunks()
        for size in sizes:
            malloc(size - 16)  # a chunk of exactly ``size`` (8 bytes of header, 16-aligned)
        if not sizes:
            break
    # tcache and fastbins: take chunks of each small size until one comes from the top.
    for size in range(32, 1056, 16):
        for _ in range(1000):
            if (malloc(size - 16) or 0) >= top:
                break
    libc.mallopt(m_mmap_threshold, 128 * 1024)  # glibc's default


def record_code(path: str) -> None:
    """Append the key of each code object this process starts, once each, to ``path``
    (CPython 3.12+): the source of :data:`HOT_CODE`."""
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is None:
        return
    roots = _roots()

    def started(code: types.CodeType, offset: int) -> object:
        # Opened per line: a forking daemon closes descriptors it does not know. A record
        # that cannot be written is not worth a shim.
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (code_key(code, roots) + "\n").encode())
            finally:
                os.close(fd)
        return monitoring.DISABLE

    tool = monitoring.PROFILER_ID
    if monitoring.get_tool(tool) is not None:
        return  # recording already (or another profiler is)
    monitoring.use_tool_id(tool, "pyrunc-record-code")
    monitoring.register_callback(tool, monitoring.events.PY_START, started)
    monitoring.set_events(tool, monitoring.events.PY_START)


def load_hot_code(path: str = HOT_CODE) -> list[str]:
    """The keys in a hot-code list, in order, without repeats (missing file: none)."""
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except OSError:
        return []
    return list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


def shape(steps: tuple[str, ...] | list[str] = STEPS, hot_code: str = HOT_CODE) -> None:
    """All of the above, in the order that works: free space sealed before the copies are
    made (else they fill the holes, scattered), reference counts last but one (everything
    made before is immortal), free space sealed again (what the steps freed).

    Nothing before CPython 3.12: there reference counting copies most of what a shim
    touches, whatever the layout."""
    if sys.version_info < (3, 12):
        return
    if "seal" in steps:
        seal_free_space()
    if "pack" in steps:
        pack_code(load_hot_code(hot_code))
    if "types" in steps:
        assign_type_versions()
        assign_dict_versions()
    gc.collect()
    if "immortal" in steps:
        immortalize()
    if "seal" in steps:
        # A full collection empties the free lists of tuples, floats, lists, dicts...: blocks
        # all over the heap that a child would take first. Empty, the seal takes them.
        gc.collect()
        seal_free_space()
