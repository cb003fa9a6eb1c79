"""Runtime v1 (legacy, one shim per container)."""
