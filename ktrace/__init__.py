"""ktrace: on-demand eBPF snapshots of what a Kubernetes node's kernel is doing."""

__version__ = "0.1.0"
