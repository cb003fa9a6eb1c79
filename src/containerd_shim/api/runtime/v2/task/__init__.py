"""containerd.task.v2: the runtime v2 Task service and its messages."""
