"""io.containerd.cgroups.v2: cgroup v2 statistics (Task.Stats payload)."""
