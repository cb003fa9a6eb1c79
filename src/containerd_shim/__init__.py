"""A containerd shim written in Python, driving runc (runtime v2 and legacy v1)."""

import sys as _sys

#: The interpreter the shim's zygote and daemons run on. The launcher sets it when
#: ``start`` and ``delete`` run on another one, chosen for starting fast.
python: str = _sys.executable
