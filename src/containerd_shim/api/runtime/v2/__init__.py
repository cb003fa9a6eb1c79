"""Runtime v2 shim APIs."""
