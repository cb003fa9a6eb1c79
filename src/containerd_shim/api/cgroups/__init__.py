"""Messages of github.com/containerd/cgroups (cgroup statistics)."""
