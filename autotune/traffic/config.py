"""Typed, frozen configs for one benchmark: what to send (workload), when (arrival), how (client), and the
SLOs that define goodput. Built from Hydra DictConfigs or plain mappings; unknown keys are rejected by name,
because a misspelled knob in a tuner silently gives a wrong result."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from omegaconf import DictConfig, OmegaConf

from serving.config import ConfigError

T = TypeVar("T")

LengthDist = Literal["constant", "uniform", "normal", "lognormal"]
Api = Literal["completions", "chat"]
ArrivalKind = Literal["poisson", "gamma", "constant", "closed"]
HttpLibrary = Literal["aiohttp", "httpx"]


def _plain(source: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, DictConfig):
        container = OmegaConf.to_container(source, resolve=True)
        if not isinstance(container, dict):
            raise ConfigError(f"expected a mapping, got {type(container).__name__}")
        return {str(k): v for k, v in container.items()}
    return dict(source)


def _check_keys(cls: type, where: str, data: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")


def _check_choice(where: str, value: object, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ConfigError(f"{where}={value!r} is not one of {list(choices)}")


@dataclass(frozen=True)
class LengthDistribution:
    """A token-length distribution; every sample is clipped to [min, max]."""

    dist: LengthDist = "constant"
    mean: int = 128
    """Mean length in tokens (the value itself for `constant`)."""
    range_ratio: float = 0.0
    """`uniform`: integers in [mean*(1-r), mean*(1+r)] (vLLM's --random-range-ratio)."""
    std: float = 0.0
    """`normal`: standard deviation in tokens; `lognormal`: sigma of log(length)."""
    min: int = 1
    max: int | None = None

    def __post_init__(self) -> None:
        _check_choice("dist", self.dist, LengthDist)
        if self.mean < 1:
            raise ConfigError(f"mean must be >= 1 token, got {self.mean}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ConfigError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.std < 0:
            raise ConfigError(f"std must be >= 0, got {self.std}")
        if self.min < 0 or (self.max is not None and self.max < self.min):
            raise ConfigError(f"need 0 <= min <= max, got min={self.min}, max={self.max}")

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | DictConfig | int, where: str) -> LengthDistribution:
        if isinstance(source, int):
            return cls(dist="constant", mean=source)
        data = _plain(source)
        _check_keys(cls, where, data)
        try:
            return cls(**data)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from error


@dataclass(frozen=True)
class WorkloadConfig:
    """What each request carries: a shared prefix (system prompt), a per-request part, an output length."""

    name: str = "chat"
    api: Api = "completions"
    """`completions`: text to /v1/completions; `chat`: system + user messages to /v1/chat/completions."""
    prefix_len: int = 0
    """Tokens of the shared system-prompt prefix, identical in every request (prefix-cache friendly)."""
    input_len: LengthDistribution = field(default_factory=LengthDistribution)
    """Tokens of the per-request part (user turn or document); prompt = prefix + this (+ special tokens)."""
    output_len: LengthDistribution = field(default_factory=lambda: LengthDistribution(mean=64))
    """max_tokens of each request; with ignore_eos the server generates exactly this many."""
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    tokenizer: str | None = None
    """Tokenizer dir or shipped model name; None: the --model name, if it resolves to a local tokenizer."""
    align_with_server: bool = True
    """Check prompt counts against the server's /tokenize (when it has one) and re-align mismatches."""

    def __post_init__(self) -> None:
        _check_choice("workload.api", self.api, Api)
        if self.prefix_len < 0:
            raise ConfigError(f"workload.prefix_len must be >= 0, got {self.prefix_len}")

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | DictConfig | None) -> WorkloadConfig:
        data = _plain(source)
        _check_keys(cls, "workload", data)
        for key in ("input_len", "output_len"):
            if key in data:
                data[key] = LengthDistribution.from_config(data[key], f"workload.{key}")
        return cls(**data)


@dataclass(frozen=True)
class ArrivalConfig:
    """When requests are sent: open loop (poisson, gamma, constant) at `rate`, or closed at `concurrency`."""

    kind: ArrivalKind = "poisson"
    rate: float = 1.0
    """Open loop: requests per second."""
    burstiness: float = 1.0
    """`gamma` shape k (vLLM's --burstiness): < 1 burstier, > 1 more regular; `poisson` is k = 1."""
    concurrency: int | None = None
    """Closed loop: requests in flight. Open loop: an optional cap (the wait is client queue time)."""
    num_requests: int | None = 32
    """Timed requests. Open loop with only duration_s: rate * duration_s. Closed loop: the cap."""
    duration_s: float | None = None
    """Stop issuing new requests after this many seconds (in-flight ones finish and count)."""
    warmup_requests: int = 0
    """Sent before the timed window and excluded from the results."""
    sweep: tuple[float, ...] | None = None
    """Rates (open loop) or concurrencies (closed loop) to run in turn; overrides rate/concurrency."""
    seed: int = 0
    normalize: bool = True
    """Rescale sampled gaps so the last arrival is at num_requests / rate, as vLLM does (steadier runs)."""

    def __post_init__(self) -> None:
        _check_choice("arrival.kind", self.kind, ArrivalKind)
        if self.kind == "closed":
            if self.concurrency is None or self.concurrency < 1:
                raise ConfigError(
                    f"arrival.concurrency must be >= 1 for a closed loop, got {self.concurrency}"
                )
            if self.num_requests is None:
                raise ConfigError(
                    "arrival.num_requests is required for a closed loop (it caps the prompt pool)"
                )
        else:
            if not (self.rate > 0 and math.isfinite(self.rate)):
                raise ConfigError(f"arrival.rate must be a positive finite req/s, got {self.rate}")
            if self.concurrency is not None and self.concurrency < 1:
                raise ConfigError(f"arrival.concurrency must be >= 1 or null, got {self.concurrency}")
            if self.num_requests is None and self.duration_s is None:
                raise ConfigError("set arrival.num_requests or arrival.duration_s to bound the run")
        if self.kind == "poisson" and self.burstiness != 1.0:
            raise ConfigError("arrival.burstiness applies to kind=gamma; poisson is gamma with k=1")
        if self.burstiness <= 0:
            raise ConfigError(f"arrival.burstiness must be > 0, got {self.burstiness}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ConfigError(f"arrival.num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ConfigError(f"arrival.duration_s must be > 0, got {self.duration_s}")
        if self.warmup_requests < 0:
            raise ConfigError(f"arrival.warmup_requests must be >= 0, got {self.warmup_requests}")
        if self.sweep is not None and (not self.sweep or min(self.sweep) <= 0):
            raise ConfigError(f"arrival.sweep must list positive values, got {self.sweep}")

    @property
    def closed(self) -> bool:
        return self.kind == "closed"

    @property
    def request_count(self) -> int:
        """Timed requests to prepare prompts for."""
        if self.num_requests is not None:
            return self.num_requests
        assert self.duration_s is not None  # checked in __post_init__
        return max(1, math.ceil(self.rate * self.duration_s))

    def expand(self) -> list[ArrivalConfig]:
        """One config per sweep point (or just this one)."""
        if self.sweep is None:
            return [self]
        if self.closed:
            return [dataclasses.replace(self, sweep=None, concurrency=int(v)) for v in self.sweep]
        return [dataclasses.replace(self, sweep=None, rate=float(v)) for v in self.sweep]

    def label(self) -> str:
        if self.closed:
            return f"closed_c{self.concurrency}"
        return f"{self.kind}_r{self.rate:g}"

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | DictConfig | None) -> ArrivalConfig:
        data = _plain(source)
        _check_keys(cls, "arrival", data)
        if data.get("sweep") is not None:
            data["sweep"] = tuple(float(v) for v in data["sweep"])
        return cls(**data)


@dataclass(frozen=True)
class SLOConfig:
    """Per-request latency objectives in ms; goodput counts completed requests meeting every one set."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    attainment: float = 0.9
    """Share of requests that must meet every SLO set (a failed request misses) for a rate to be carried."""

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "e2el_ms"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"slo.{name} must be >= 0 ms or null, got {value}")
        if not 0 < self.attainment <= 1:
            raise ConfigError(f"slo.attainment must be in (0, 1], got {self.attainment}: e.g. 0.9")

    def miss_bound_s(self, output_len: int) -> float | None:
        """Seconds after which a request of `output_len` tokens has surely missed an SLO (None: never)."""
        if self.e2el_ms is not None:
            return self.e2el_ms / 1000.0
        if self.ttft_ms is not None and self.tpot_ms is not None:
            return (self.ttft_ms + self.tpot_ms * max(output_len - 1, 0)) / 1000.0
        return None

    def as_dict(self) -> dict[str, float]:
        """vLLM's goodput dict: {"ttft": ms, ...} with only the objectives that are set."""
        pairs = {"ttft": self.ttft_ms, "tpot": self.tpot_ms, "e2el": self.e2el_ms}
        return {k: float(v) for k, v in pairs.items() if v is not None}

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | DictConfig | None) -> SLOConfig:
        data = _plain(source)
        _check_keys(cls, "slo", data)
        return cls(**data)


@dataclass(frozen=True)
class ClientConfig:
    """How the load generator itself runs."""

    processes: int = 1
    """Client processes sharing the schedule (request i goes to process i % processes)."""
    timeout_s: float = 600.0
    """Whole-request time limit; a request over it fails with reason `timeout`."""
    connect_timeout_s: float = 10.0
    max_connections: int | None = None
    """Keep-alive pool size; None: the concurrency (closed loop or cap), else the request count (max 4096)."""
    uvloop: bool = True
    """Run the client event loop on uvloop when it is installed (less client overhead)."""
    http: HttpLibrary = "aiohttp"
    """HTTP library for the timed requests: aiohttp (default: ~6x less CPU per request here) or httpx."""

    def __post_init__(self) -> None:
        _check_choice("client.http", self.http, HttpLibrary)
        if self.processes < 1:
            raise ConfigError(f"client.processes must be >= 1, got {self.processes}")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ConfigError("client.timeout_s and client.connect_timeout_s must be > 0")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError(f"client.max_connections must be >= 1 or null, got {self.max_connections}")

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | DictConfig | None) -> ClientConfig:
        data = _plain(source)
        _check_keys(cls, "client", data)
        return cls(**data)


@dataclass(frozen=True)
class CapacityConfig:
    """The load search: the highest open-loop rate whose SLO attainment stays >= slo.attainment.

    A closed probe bounds the rate; open-loop steps at the nominal rate, then geometric, then bisection
    (on the log scale) bracket it; each step sends `step_s` seconds of arrivals and ends early once the
    misses already certain make the target unreachable."""

    enabled: bool = True
    """false: measure only the fixed load of the arrival section (the objectives of before)."""
    probe_concurrency: int | None = None
    """Requests in flight in the probe; null: the batch limit (max_num_seqs x dp), or 32 for a URL."""
    probe_timeout_s: float = 20.0
    """The probe's wall-time bound (requests still running then are cancelled)."""
    step_s: float = 10.0
    """Seconds of arrivals per load step: long enough for a backlog to show."""
    min_requests: int = 30
    """At least this many requests per step, so the attainment estimate means something."""
    max_requests: int = 400
    max_steps: int = 6
    """Open-loop steps per search, the nominal-rate step included."""
    tolerance: float = 0.15
    """Stop when the lowest failing rate is within this fraction above the highest carried one."""
    sustain_s: float = 60.0
    """A carried rate's TTFT trend, projected this many seconds on, must stay within the TTFT SLO."""
    below_nominal: bool = False
    """Search on below a nominal rate that is not carried. Off by default: such a deployment misses the
    study's SLO constraint and cannot be on the front, so its exact capacity is not worth the minutes
    (it is reported as 0, below the nominal rate)."""
    prune_dominated: bool = True
    """In a study: end the search after the nominal step when even the best the trial can still reach
    (capacity up to prune_margin x the probe's rate) is dominated by a measured trial (autotune/study/
    front_gate.py). The trial is recorded PRUNED with the reason and the figures it has."""
    prune_margin: float = 3.0
    """How far above the probe's closed-loop rate the capacity is still thought possible. One closed wave
    undercounts a continuous batcher (its tail drains alone, slow requests hit probe_timeout_s): capacities
    up to 1.7x the probe's rate were measured (bench/spaces/policies.yaml, docs/benchmarks.md)."""

    def __post_init__(self) -> None:
        if not self.prune_margin >= 1.0:
            raise ConfigError(
                f"capacity.prune_margin must be >= 1 (a multiple of the probe rate), got {self.prune_margin}"
            )
        for name in ("probe_timeout_s", "step_s", "tolerance", "sustain_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"capacity.{name} must be > 0, got {getattr(self, name)}")
        if self.probe_concurrency is not None and self.probe_concurrency < 1:
            raise ConfigError(
                f"capacity.probe_concurrency must be >= 1 or null, got {self.probe_concurrency}"
            )
        if not 1 <= self.min_requests <= self.max_requests:
            raise ConfigError(
                f"capacity.min_requests={self.min_requests} and max_requests={self.max_requests}: "
                "use 1 <= min_requests <= max_requests"
            )
        if self.max_steps < 2:
            raise ConfigError(f"capacity.max_steps must be >= 2 (nominal + one more), got {self.max_steps}")

    @staticmethod
    def check_traffic(arrival: ArrivalConfig, slo: SLOConfig | None) -> None:
        """The search needs an SLO to search under and open-loop rates to search over."""
        if slo is None or not slo.as_dict():
            raise ConfigError(
                "capacity.enabled=true needs an SLO to search under: set slo.ttft_ms, slo.tpot_ms or "
                "slo.e2el_ms (conf/slo/), or capacity.enabled=false for the fixed load only"
            )
        if arrival.closed or arrival.sweep is not None:
            raise ConfigError(
                f"capacity.enabled=true searches open-loop rates, but arrival.kind={arrival.kind!r} and "
                f"arrival.sweep={arrival.sweep}: use an open-loop arrival without a sweep (arrival=poisson), "
                "or capacity.enabled=false"
            )

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | DictConfig | None) -> CapacityConfig:
        data = _plain(source)
        _check_keys(cls, "capacity", data)
        return cls(**data)
