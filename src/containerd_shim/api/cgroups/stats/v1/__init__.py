"""io.containerd.cgroups.v1: cgroup v1 statistics (Task.Stats payload)."""
