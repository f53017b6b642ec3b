"""Names that cross a process or pod boundary: ports, environment variables, labels, paths.

Defined once here and imported everywhere else (workers, operator, chart tests). This module holds
constants only: no logic, no imports beyond the standard library, so the operator can import it
without torch.
"""

from __future__ import annotations

from typing import Final

# gRPC
GRPC_PACKAGE: Final = "moeserve.v1"
INFERENCE_SERVICE: Final = "moeserve.v1.Inference"  # full service name, as health checks name it
DEFAULT_GRPC_PORT: Final = 50051
GRPC_PORT_NAME: Final = "grpc"  # Kubernetes container/Service port name

# Prometheus metrics (plain HTTP)
DEFAULT_METRICS_PORT: Final = 9400
METRICS_PORT_NAME: Final = "metrics"
METRICS_PATH: Final = "/metrics"
METRICS_PREFIX: Final = "moeserve_"  # every metric name starts with this

# Environment variables read by worker processes (the CLI flags win when both are given)
ENV_MODEL_PATH: Final = "MOESERVE_MODEL_PATH"
ENV_GRPC_PORT: Final = "MOESERVE_GRPC_PORT"
ENV_METRICS_PORT: Final = "MOESERVE_METRICS_PORT"

# Kubernetes API
API_GROUP: Final = "moeserve.io"
API_VERSION: Final = "v1alpha1"
KIND: Final = "MoEService"
PLURAL: Final = "moeservices"
SHORT_NAME: Final = "moe"

# Labels on every object the operator makes
LABEL_SERVICE: Final = "moeserve.io/service"
LABEL_ROLE: Final = "moeserve.io/role"
ROLE_HEAD: Final = "head"
ROLE_ATTENTION: Final = "attention"
ROLE_EXPERT: Final = "expert"

# Ray Serve application (the operator deploys exactly these)
SERVE_IMPORT_PATH: Final = "moeserve.workers.serve_app:build_app"
SERVE_GRPC_SERVICER_FUNCTION: Final = "moeserve.v1.inference_pb2_grpc.add_InferenceServicer_to_server"
RAY_RESOURCE_ATTENTION: Final = "moeserve_attention"  # custom resource of attention worker pods
RAY_RESOURCE_EXPERT: Final = "moeserve_expert"  # custom resource of expert worker pods
