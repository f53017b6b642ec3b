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
HTTP_PORT_NAME: Final = "http"  # the OpenAI HTTP API (Ray Serve's HTTP proxy under the operator)

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

# Operator-made objects: labels, annotations and names on pods, Services and ConfigMaps
LABEL_INDEX: Final = "moeserve.io/index"  # a worker pod's index within its group (0..size-1)
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "moeserve-operator"
ANNOTATION_TEMPLATE_HASH: Final = "moeserve.io/template-hash"  # hash of the pod template a pod was made from
ANNOTATION_HEAD_UID: Final = "moeserve.io/head-uid"  # uid of the Ray head pod a worker pod joined
ANNOTATION_GROUP_SIZE: Final = "moeserve.io/group-size"  # size of the worker group a pod belongs to
# A worker pod's model instance (index // ranks): the key of the instance packing affinity terms
# (matchLabelKeys / mismatchLabelKeys) and a Ray node label of the pod's Ray node.
LABEL_INSTANCE: Final = "moeserve.io/instance"
# On the head pod while Ray reports the Serve application RUNNING; the client Service selects it.
LABEL_SERVE_READY: Final = "moeserve.io/serve"
SERVE_READY: Final = "true"
# Init containers of the Ray pods
MODEL_CHECK_CONTAINER: Final = "model-check"  # fails, with a termination message, without the model
WAIT_FOR_HEAD_CONTAINER: Final = "wait-for-head"  # workers: until the head's GCS answers
MODEL_VOLUME_NAME: Final = "model"

# Ray cluster inside the pods
RAY_GCS_PORT: Final = 6379
RAY_GCS_PORT_NAME: Final = "gcs"
RAY_DASHBOARD_PORT: Final = 8265
RAY_DASHBOARD_PORT_NAME: Final = "dashboard"
# Every Ray node's dashboard agent (`ray start --dashboard-agent-listen-port`); probes use its
# unauthenticated /api/local_raylet_healthz.
RAY_AGENT_PORT: Final = 52365
RAY_AGENT_PORT_NAME: Final = "agent"
RAY_GCS_HEALTH_PATH: Final = "/api/gcs_healthz"  # head dashboard: GCS alive (no token needed)
RAY_RAYLET_HEALTH_PATH: Final = "/api/local_raylet_healthz"  # agent: this node's raylet alive in GCS
RAY_SERVE_APPLICATIONS_PATH: Final = "/api/serve/applications/"  # Ray's Serve REST API (PUT, GET)
# Ray custom resources: one unit per worker pod; each rank's actor asks for one unit of its role's.
# Ray token authentication (Ray >= 2.52): every Ray pod of a MoEService reads one token from a
# Secret the operator creates; the operator sends it to the dashboard as a bearer token.
ENV_RAY_AUTH_MODE: Final = "RAY_AUTH_MODE"
ENV_RAY_AUTH_TOKEN: Final = "RAY_AUTH_TOKEN"
RAY_AUTH_SECRET_KEY: Final = "token"
RAY_RESOURCE_ATTENTION: Final = "moeserve_attention"
RAY_RESOURCE_EXPERT: Final = "moeserve_expert"

# The Serve application
SERVE_APP_NAME: Final = "moeserve"
SERVE_APP_IMPORT_PATH: Final = "moeserve.workers.ray_app.app:build_app"
SERVE_GRPC_SERVICER_FUNCTIONS: Final = (
    "moeserve.v1.inference_pb2_grpc.add_InferenceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",  # grpc.health.v1.Health/Check
)
SERVE_CONFIG_KEY: Final = "serve-app-config.json"  # ConfigMap key: the ServeAppConfig (the app's args)
SERVE_DEPLOY_KEY: Final = "serve-deploy.json"  # ConfigMap key: the body of PUT /api/serve/applications/
SERVE_CONFIG_DIR: Final = "/etc/moeserve"  # where the head pod mounts that ConfigMap
