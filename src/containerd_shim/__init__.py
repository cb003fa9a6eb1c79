"""A containerd shim written in Python, driving runc (runtime v2 and legacy v1)."""
