"""cgroup v1 statistics."""
