"""moeserve: Kubernetes-native inference for DeepSeek-V2-style Mixture-of-Experts models.

This root package holds only what crosses process and pod boundaries (the contract module and
generated gRPC code); the model runtime lives in `moeserve.workers`, the operator in
`moeserve.operator`.
"""

__version__ = "0.1.0"
