"""The one config of a moeserve Ray Serve application, shared by the app builder and the operator.

The operator generates exactly this (as JSON in a ConfigMap and as the `args` of the Serve
application); the Ray Serve app builder validates it before anything starts. Pure data and
validation: no torch, no ray, no kubernetes imports.
Every error is a `ServeConfigError` whose message starts with the dotted path of the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from moeserve.engine_settings import EngineSettings, RequestLimits

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
"""`auto`: each instance's attention rank 0 picks the dtype for its host from the checkpoint's dtype
(`workers/model/dtype_policy.py`: e.g. fp32 on an AVX2-only CPU) before any rank loads."""
DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")
Fp8Weights = Literal["dequantize", "keep"]
"""How an FP8 checkpoint's weights are held (`workers/model/fp8.py`): `dequantize`: to the model
dtype at load; `keep`: fp8 in memory, dequantized inside each product."""
FP8_WEIGHTS: tuple[str, ...] = ("dequantize", "keep")


class ServeConfigError(ValueError):
    """A config that cannot be realised; the message names the field (e.g. `engine.block_size`)."""


@dataclass(frozen=True)
class ModelSpec:
    path: str = ""
    """Checkpoint directory (Hugging Face layout) readable by every rank; "" = the embedded model."""
    dtype: Dtype = "auto"
    """Weight, activation and KV-cache dtype; `auto` as `moeserve serve --dtype auto`, decided on the
    ranks' host."""
    fp8_weights: Fp8Weights = "dequantize"
    """An FP8 checkpoint's weights: dequantized to `dtype` at load, or kept fp8 (dequantized per
    block inside each matmul: half the memory); no effect on other checkpoints."""


@dataclass(frozen=True)
class Ports:
    grpc: int = 9000
    """Ray Serve's gRPC proxy port (clients connect here)."""
    metrics: int = 8080
    """Prometheus port (`/metrics`) of Ray's metrics agent on every node (`ray start
    --metrics-export-port`; `moeserve serve --ray` sets it on the Ray it starts): Ray's metrics and
    the attention ranks' engine metrics as `ray_moeserve_*`."""
    http: int = 8000
    """Ray Serve's HTTP proxy port: the OpenAI HTTP API (`/v1/...`, `/health`). 0: no HTTP API
    (Serve's proxy then listens on a free loopback port that nothing is told about)."""


@dataclass(frozen=True)
class OpenAISpec:
    served_model_name: str = ""
    """The model's name in the OpenAI API; "" = the model directory's name."""
    chat_template: str = ""
    """A jinja2 chat template (its text) overriding the model's (`tokenizer_config.json`); "" = none."""


@dataclass(frozen=True)
class ServeAppConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    replicas: int = 1
    """Model instances (Serve replicas), each one torch.distributed world."""
    attention_ranks: int = 1
    """Data-parallel attention ranks per instance."""
    expert_ranks: int = 1
    """Expert ranks per instance (the routed experts live there; at least one)."""
    placement: list[list[int]] | None = None
    """Routed expert ids hosted by each expert rank; None = contiguous (group-aligned)."""
    redundant_experts: int = 0
    """Expert slots beyond one per routed expert over the expert ranks (hot experts get replicas)."""
    rebalance_interval: int = 0
    """Steps between EPLB rebalance checks on every instance (0: only on request, `POST
    /admin/experts/rebalance`)."""
    rebalance_min_gain: float = 0.05
    """Least relative drop of a MoE layer's predicted max/mean expert-rank load for a new map to be
    taken (0: any gain)."""
    gpus_per_attention_rank: float = 0.0
    """GPUs a Ray actor of an attention rank asks for (0 on CPU clusters)."""
    gpus_per_expert_rank: float = 0.0
    """GPUs a Ray actor of an expert rank asks for."""
    collective_timeout_s: float = 60.0
    """Seconds before a rank stuck in a collective gives up and the instance rebuilds."""
    engine: EngineSettings = field(default_factory=EngineSettings)
    """Limits of every attention rank's engine (the same type `moeserve serve` builds from its flags)."""
    ports: Ports = field(default_factory=Ports)
    openai: OpenAISpec = field(default_factory=OpenAISpec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> ServeAppConfig:
        if not isinstance(raw, dict):
            raise ServeConfigError(f"config: expected a mapping, got {type(raw).__name__}")
        cfg = _build(cls, raw, "")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _check(self.replicas >= 1, "replicas", "must be >= 1")
        _check(self.attention_ranks >= 1, "attention_ranks", "must be >= 1")
        _check(self.expert_ranks >= 1, "expert_ranks", "must be >= 1 (routed experts live on expert ranks)")
        _check(self.model.dtype in DTYPES, "model.dtype", f"must be one of {', '.join(DTYPES)}")
        _check(
            self.model.fp8_weights in FP8_WEIGHTS,
            "model.fp8_weights",
            f"must be one of {', '.join(FP8_WEIGHTS)}",
        )
        _check(self.gpus_per_attention_rank >= 0, "gpus_per_attention_rank", "must be >= 0")
        _check(self.gpus_per_expert_rank >= 0, "gpus_per_expert_rank", "must be >= 0")
        _check(self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0")
        _check(self.redundant_experts >= 0, "redundant_experts", "must be >= 0")
        _check(self.rebalance_interval >= 0, "rebalance_interval", "must be >= 0 steps (0: only on request)")
        _check(0 <= self.rebalance_min_gain < 1, "rebalance_min_gain", "must be in [0, 1)")
        _check(isinstance(self.engine, EngineSettings), "engine", "expected engine settings")
        for name in ("grpc", "metrics"):
            port = getattr(self.ports, name)
            _check(1 <= port <= 65535, f"ports.{name}", f"{port} is not a valid port")
        _check(self.ports.grpc != self.ports.metrics, "ports.metrics", "must differ from ports.grpc")
        http = self.ports.http
        _check(0 <= http <= 65535, "ports.http", f"{http} is not a valid port (0: no HTTP API)")
        _check(
            self.ports.http not in (self.ports.grpc, self.ports.metrics),
            "ports.http",
            "must differ from ports.grpc and ports.metrics",
        )
        if self.placement is not None:
            _check(
                len(self.placement) == self.expert_ranks,
                "placement",
                f"has {len(self.placement)} entries for {self.expert_ranks} expert ranks",
            )
            hosted = [e for rank in self.placement for e in rank]
            dupes = sorted({e for e in hosted if hosted.count(e) > 1})
            _check(  # with redundant slots an expert may be on several ranks (the app checks the map)
                not dupes or self.redundant_experts > 0,
                "placement",
                f"experts {dupes} are hosted more than once",
            )
            _check(all(e >= 0 for e in hosted), "placement", "expert ids must be >= 0")
            _check(all(rank for rank in self.placement), "placement", "every expert rank must host an expert")


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ServeConfigError(f"{path}: {message}")


# ServeAppConfig field (or engine field) -> the dataclass its mapping is read into
_NESTED: dict[tuple[type, str], type] = {
    (ServeAppConfig, "model"): ModelSpec,
    (ServeAppConfig, "engine"): EngineSettings,
    (ServeAppConfig, "ports"): Ports,
    (ServeAppConfig, "openai"): OpenAISpec,
    (EngineSettings, "limits"): RequestLimits,
}


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ServeConfigError(f"{prefix}{unknown[0]}: unknown field")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        path = f"{prefix}{name}"
        if (cls, name) in _NESTED:
            if not isinstance(value, dict):
                raise ServeConfigError(f"{path}: expected a mapping")
            kwargs[name] = _build(_NESTED[cls, name], value, f"{path}.")
        else:
            kwargs[name] = _coerce(value, known[name].type, path)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a dataclass's own check (EngineSettings): its message starts with the field
        raise ServeConfigError(f"{prefix}{e}") from None


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    text = str(annotation)
    if value is None:
        if "None" in text:
            return None
        raise ServeConfigError(f"{path}: must not be null")
    if "list[list[int]]" in text:
        if not (isinstance(value, list) and all(isinstance(r, list) for r in value)):
            raise ServeConfigError(f"{path}: expected a list of lists of expert ids")
        if not all(isinstance(e, int) and not isinstance(e, bool) for r in value for e in r):
            raise ServeConfigError(f"{path}: expert ids must be integers")
        return [list(r) for r in value]
    if text.startswith("bool"):
        if not isinstance(value, bool):
            raise ServeConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if text.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ServeConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if text.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ServeConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ServeConfigError(f"{path}: expected a string, got {value!r}")
    return value
