"""The MoEService spec as typed, defaulted values, and the Serve application config it maps onto.

`MoEServiceSpec.from_dict` reads a MoEService's `spec` (camelCase, as the API server stores it) into
frozen dataclasses whose defaults equal the CRD's (tests/unit/test_operator_builders.py holds the two
together). `serve_app_config` maps it onto `ServeAppConfig`, validated exactly as the Ray Serve app
builder validates it.

This module is not the first line of validation: the API server's schema and CEL rules reject what
they can see; what only `ServeAppConfig` can tell (e.g. an expert placed on two ranks) surfaces here as
`ServeConfigError`. Pure: no Kubernetes client, no kopf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from moeserve.engine_settings import EngineSettings
from moeserve.serve_config import FP8_WEIGHTS, ModelSpec, Ports, ServeAppConfig

Packing = Literal["Preferred", "Required"]
PACKINGS: tuple[str, ...] = ("Preferred", "Required")
DEFAULT_TOPOLOGY_KEY = "kubernetes.io/hostname"
VOLUME_SOURCES: tuple[str, ...] = ("persistentVolumeClaim", "hostPath", "image", "nfs", "csi")
"""The Kubernetes volume sources `spec.model.volume` may name (the CRD's schema spells out each)."""
PULL_POLICIES: tuple[str, ...] = ("Always", "IfNotPresent", "Never")
DEFAULT_STARTUP_S = 600

# CRD name (camelCase) -> EngineSettings field (`spec.model.maxModelLen` is its max_model_len).
ENGINE_FIELDS: dict[str, str] = {
    "maxRunningRequests": "max_num_seqs",
    "maxWaitingRequests": "max_waiting",
    "maxTokensPerStep": "max_num_batched_tokens",
    "kvCacheTokens": "kv_cache_tokens",
    "blockSize": "block_size",
}
"""Integer engine limits: CRD name under spec.serving.engine -> EngineSettings field."""
PREFIX_CACHING_FIELD = "prefixCaching"  # spec.serving.engine.prefixCaching -> prefix_caching (bool)
# spec.serving.engine.speculative ("mtp" or absent) and numSpeculativeTokens (1-3): MTP drafting
SPECULATIVE_FIELDS: dict[str, str] = {
    "speculative": "speculative",
    "numSpeculativeTokens": "num_speculative_tokens",
}


class SpecError(ValueError):
    """A spec that cannot be read; the message starts with the field path (`spec.replicas: ...`)."""


@dataclass(frozen=True)
class ModelSource:
    path: str
    """Checkpoint directory or URI, readable from every rank's pod."""
    dtype: str = ModelSpec.dtype
    """Weight, activation and KV-cache dtype (auto, bfloat16, float16, float32); auto: chosen on the
    ranks' host for the checkpoint."""
    fp8_weights: str = ModelSpec.fp8_weights
    """An FP8 checkpoint's weights: "dequantize" to `dtype` at load, or "keep" them fp8."""
    max_model_len: int | None = None
    """Longest prompt + completion in tokens; None = the checkpoint's."""
    volume: Mapping[str, Any] | None = None
    """A Kubernetes volume source with exactly one of VOLUME_SOURCES, mounted read-only at `path`
    in every Ray pod; None = the image (or a node-level mount) provides `path`."""
    sub_path: str = ""
    """Directory inside the volume that holds the checkpoint; "" = the volume's root."""


@dataclass(frozen=True)
class Probes:
    startup_s: int = DEFAULT_STARTUP_S
    """Seconds a Ray pod's startup probe allows before the kubelet kills it (a generous budget for
    slow nodes and cold volumes; liveness and readiness probing start after it)."""


@dataclass(frozen=True)
class RankGroup:
    """The attention or the expert ranks of one model instance."""

    ranks: int
    """Ranks per model instance; each rank is one pod."""
    gpus_per_rank: int = 1
    """`nvidia.com/gpu` of each rank's pod (and GPUs its Ray actor asks for)."""
    resources: Mapping[str, Any] = field(default_factory=dict)
    """Container `requests`/`limits` besides GPUs (cpu, memory, ...)."""
    placement: tuple[tuple[int, ...], ...] | None = None
    """Experts only: routed expert ids per expert rank; None = contiguous."""
    redundant: int = 0
    """Experts only: expert slots beyond one per routed expert (`--redundant-experts`)."""
    rebalance_interval: int = ServeAppConfig.rebalance_interval
    """Experts only: steps between EPLB rebalance checks (`--rebalance-interval`); 0 = on request."""
    rebalance_min_gain: float = ServeAppConfig.rebalance_min_gain
    """Experts only: least relative drop of predicted max/mean rank load for a new map."""


@dataclass(frozen=True)
class Serving:
    grpc_port: int = Ports.grpc
    """Ray Serve gRPC proxy port: on the head pod, the head Service and the client Service."""
    http_port: int = Ports.http
    """Ray Serve HTTP proxy port (the OpenAI HTTP API): on the head pod, the head Service and the
    client Service (port name `http`)."""
    metrics_port: int = Ports.metrics
    """Prometheus port of attention rank 0 of each model instance."""
    collective_timeout_s: float = ServeAppConfig.collective_timeout_s
    """Seconds before a rank stuck in a collective gives up and its instance rebuilds."""
    engine: EngineSettings = field(default_factory=EngineSettings)


@dataclass(frozen=True)
class Scheduling:
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    """Merged into every pod's affinity (worker pods also get the instance packing terms)."""
    topology_key: str = DEFAULT_TOPOLOGY_KEY
    """Node label of the domain (rack, zone) that the ranks of one model instance are packed into
    after their node, and that different instances spread over (builders.instance_affinity)."""
    packing: Packing = "Preferred"
    """Preferred: packing and spreading are scheduler preferences. Required: the ranks of one
    instance must share a topology_key domain (pods wait Pending rather than straddle two)."""
    priority_class_name: str = ""


@dataclass(frozen=True)
class MoEServiceSpec:
    image: str
    """Image of the Ray head and worker pods (moeserve with the `ray` extra)."""
    model: ModelSource
    image_pull_policy: str = ""
    """Always, IfNotPresent or Never; "" = Kubernetes' default for the image's tag."""
    probes: Probes = field(default_factory=Probes)
    replicas: int = ServeAppConfig.replicas
    """Model instances; 0 keeps the Ray head but runs no worker pods and no Serve application."""
    attention: RankGroup = field(default_factory=lambda: RankGroup(ranks=ServeAppConfig.attention_ranks))
    experts: RankGroup = field(default_factory=lambda: RankGroup(ranks=ServeAppConfig.expert_ranks))
    serving: Serving = field(default_factory=Serving)
    scheduling: Scheduling = field(default_factory=Scheduling)
    head_resources: Mapping[str, Any] = field(default_factory=dict)
    """Container requests/limits of the Ray head pod."""

    @classmethod
    def from_dict(cls, raw: Any) -> MoEServiceSpec:
        spec = _mapping(raw, "spec")
        model = _mapping(spec.get("model"), "spec.model")
        attention = _mapping(spec.get("attention", {}), "spec.attention")
        experts = _mapping(spec.get("experts", {}), "spec.experts")
        serving = _mapping(spec.get("serving", {}), "spec.serving")
        engine = _mapping(serving.get("engine", {}), "spec.serving.engine")
        scheduling = _mapping(spec.get("scheduling", {}), "spec.scheduling")
        head = _mapping(spec.get("head", {}), "spec.head")
        probes = _mapping(spec.get("probes", {}), "spec.probes")
        placement = experts.get("placement")
        return cls(
            image=_value(spec, "image", str, "spec", required=True),
            image_pull_policy=_choice(spec, "imagePullPolicy", ("", *PULL_POLICIES), "spec", ""),
            model=ModelSource(
                path=_value(model, "path", str, "spec.model", required=True),
                dtype=_value(model, "dtype", str, "spec.model", ModelSource.dtype),
                fp8_weights=_choice(model, "fp8Weights", FP8_WEIGHTS, "spec.model", ModelSource.fp8_weights),
                max_model_len=_value(model, "maxModelLen", int, "spec.model", None),
                volume=_volume(model.get("volume"), "spec.model.volume"),
                sub_path=_value(model, "subPath", str, "spec.model", ""),
            ),
            probes=Probes(
                startup_s=_value(probes, "startupSeconds", int, "spec.probes", DEFAULT_STARTUP_S),
            ),
            replicas=_value(spec, "replicas", int, "spec", cls.replicas),
            attention=_rank_group(attention, "spec.attention", ServeAppConfig.attention_ranks),
            experts=replace(
                _rank_group(experts, "spec.experts", ServeAppConfig.expert_ranks, placement),
                redundant=_value(experts, "redundant", int, "spec.experts", RankGroup.redundant),
                rebalance_interval=_value(
                    experts, "rebalanceInterval", int, "spec.experts", RankGroup.rebalance_interval
                ),
                rebalance_min_gain=float(
                    _value(
                        experts,
                        "rebalanceMinGain",
                        (int, float),
                        "spec.experts",
                        RankGroup.rebalance_min_gain,
                    )
                ),
            ),
            serving=Serving(
                grpc_port=_value(serving, "grpcPort", int, "spec.serving", Serving.grpc_port),
                http_port=_value(serving, "httpPort", int, "spec.serving", Serving.http_port),
                metrics_port=_value(serving, "metricsPort", int, "spec.serving", Serving.metrics_port),
                collective_timeout_s=float(
                    _value(
                        serving,
                        "collectiveTimeoutSeconds",
                        (int, float),
                        "spec.serving",
                        Serving.collective_timeout_s,
                    )
                ),
                engine=_engine_settings(engine),
            ),
            scheduling=Scheduling(
                node_selector=dict(
                    _mapping(scheduling.get("nodeSelector", {}), "spec.scheduling.nodeSelector")
                ),
                tolerations=tuple(_value(scheduling, "tolerations", list, "spec.scheduling", [])),
                affinity=dict(_mapping(scheduling.get("affinity", {}), "spec.scheduling.affinity")),
                topology_key=_value(scheduling, "topologyKey", str, "spec.scheduling", DEFAULT_TOPOLOGY_KEY),
                packing=_choice(scheduling, "packing", PACKINGS, "spec.scheduling", "Preferred"),
                priority_class_name=_value(scheduling, "priorityClassName", str, "spec.scheduling", ""),
            ),
            head_resources=dict(_mapping(head.get("resources", {}), "spec.head.resources")),
        )

    def group(self, role: Literal["attention", "expert"]) -> RankGroup:
        return self.attention if role == "attention" else self.experts

    def group_size(self, role: Literal["attention", "expert"]) -> int:
        """Pods of a worker group: one per rank per model instance."""
        return self.replicas * self.group(role).ranks


def _engine_settings(engine: Mapping[str, Any]) -> EngineSettings:
    values: dict[str, Any] = {
        py: _value(engine, crd, int, "spec.serving.engine", getattr(EngineSettings, py))
        for crd, py in ENGINE_FIELDS.items()
    }
    values["prefix_caching"] = _flag(engine, PREFIX_CACHING_FIELD, "spec.serving.engine", True)
    if engine.get("speculative") is not None:
        values["speculative"] = _choice(engine, "speculative", ("mtp",), "spec.serving.engine", "mtp")
    values["num_speculative_tokens"] = _value(
        engine, "numSpeculativeTokens", int, "spec.serving.engine", EngineSettings.num_speculative_tokens
    )
    try:
        return EngineSettings(**values)
    except ValueError as e:  # the message starts with the EngineSettings field
        field_name, _, problem = str(e).partition(": ")
        names = {**ENGINE_FIELDS, **SPECULATIVE_FIELDS}
        crd = {py: crd for crd, py in names.items()}.get(field_name, field_name)
        raise SpecError(f"spec.serving.engine.{crd}: {problem}") from None


def serve_app_config(spec: MoEServiceSpec, replicas: int | None = None) -> ServeAppConfig:
    """The Serve application's config for `spec`, validated by `ServeAppConfig.from_dict`.

    `replicas` overrides spec.replicas (the operator validates a scaled-to-zero spec with 1).
    Raises `ServeConfigError` naming the ServeAppConfig field.
    """
    placement = spec.experts.placement
    raw = {
        "model": {"path": spec.model.path, "dtype": spec.model.dtype, "fp8_weights": spec.model.fp8_weights},
        "replicas": spec.replicas if replicas is None else replicas,
        "attention_ranks": spec.attention.ranks,
        "expert_ranks": spec.experts.ranks,
        "placement": None if placement is None else [list(rank) for rank in placement],
        "redundant_experts": spec.experts.redundant,
        "rebalance_interval": spec.experts.rebalance_interval,
        "rebalance_min_gain": spec.experts.rebalance_min_gain,
        "gpus_per_attention_rank": float(spec.attention.gpus_per_rank),
        "gpus_per_expert_rank": float(spec.experts.gpus_per_rank) if spec.experts.ranks else 0.0,
        "collective_timeout_s": spec.serving.collective_timeout_s,
        "engine": {
            **{f: getattr(spec.serving.engine, f) for f in ENGINE_FIELDS.values()},
            "prefix_caching": spec.serving.engine.prefix_caching,
            "max_model_len": spec.model.max_model_len,
            **{f: getattr(spec.serving.engine, f) for f in SPECULATIVE_FIELDS.values()},
        },
        "ports": {
            "grpc": spec.serving.grpc_port,
            "metrics": spec.serving.metrics_port,
            "http": spec.serving.http_port,
        },
    }
    return ServeAppConfig.from_dict(raw)


# -- readers: the API server has applied the CRD's types and defaults; these apply the same defaults
#    to a partial spec (tests, hand-made objects) and name the field when a value has the wrong type.


def _rank_group(raw: Mapping[str, Any], path: str, default_ranks: int, placement: Any = None) -> RankGroup:
    return RankGroup(
        ranks=_value(raw, "ranks", int, path, default_ranks),
        gpus_per_rank=_value(raw, "gpusPerRank", int, path, RankGroup.gpus_per_rank),
        resources=dict(_mapping(raw.get("resources", {}), f"{path}.resources")),
        placement=None if placement is None else _placement(placement, f"{path}.placement"),
    )


def _volume(raw: Any, path: str) -> Mapping[str, Any] | None:
    if raw is None:
        return None
    volume = _mapping(raw, path)
    sources = [key for key in volume if key in VOLUME_SOURCES]
    if len(sources) != 1 or len(volume) != 1:
        raise SpecError(f"{path}: must set exactly one of {', '.join(VOLUME_SOURCES)}, got {sorted(volume)}")
    return {sources[0]: dict(_mapping(volume[sources[0]], f"{path}.{sources[0]}"))}


def _placement(raw: Any, path: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(raw, list) or not all(isinstance(rank, list) for rank in raw):
        raise SpecError(f"{path}: expected a list of lists of expert ids")
    if not all(isinstance(e, int) and not isinstance(e, bool) for rank in raw for e in rank):
        raise SpecError(f"{path}: expert ids must be integers")
    return tuple(tuple(rank) for rank in raw)


def _mapping(raw: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{path}: expected an object, got {type(raw).__name__}")
    return raw


def _value(
    raw: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    path: str,
    default: Any = None,
    required: bool = False,
) -> Any:
    if key not in raw or raw[key] is None:
        if required:
            raise SpecError(f"{path}.{key}: required")
        return default
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SpecError(f"{path}.{key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _flag(raw: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"{path}.{key}: expected a boolean, got {value!r}")
    return value


def _choice(raw: Mapping[str, Any], key: str, choices: tuple[str, ...], path: str, default: str) -> Any:
    value = _value(raw, key, str, path, default)
    if value not in choices:
        raise SpecError(f"{path}.{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list"}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
