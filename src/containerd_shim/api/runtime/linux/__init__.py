"""Legacy linux runtime (runtime v1) types."""
