"""Runtime v1 shim API."""
