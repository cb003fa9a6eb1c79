"""Runtime v2 runc shim types."""
