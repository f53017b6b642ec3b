"""Kubernetes operator for MoEService resources. Never imports torch."""
