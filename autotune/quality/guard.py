"""The quality guard of a study: the reference's answers (computed once, cached in the study directory),
the probe every trial runs before its server stops, and the bounds that make a trial infeasible.

Call order: `ready()` before each trial's server starts (the first call launches the reference deployment,
unless the cache in <run dir>/quality/reference.json matches the probe and reference; later calls return
at once), then `probe(url, model, trial_dir)` while the trial's server still runs. A reference that
cannot be computed is reported by every probe, not retried. A probe that fails (e.g. a backend that
refuses logprobs) returns no quality metrics, so the trial's quality bounds count as violated; the
reason is in quality.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autotune.quality.probe import ProbeClient, Scored, compare, probe_texts
from autotune.quality.settings import QualitySettings
from autotune.traffic.config import WorkloadConfig
from serving.config import ConfigError, DeploymentConfig

log = logging.getLogger(__name__)

SYNTHETIC_NOTE = (
    "dummy (random) weights: these quality numbers are synthetic and say nothing about a real model"
)


@dataclass(frozen=True)
class Reference:
    """The reference's answers: probe prompts, greedy continuations, and its own teacher-forced scores."""

    key: str
    prompts: list[list[int]]
    continuations: list[list[int]]
    scores: list[Scored]

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "prompts": self.prompts,
            "continuations": self.continuations,
            "scores": [s.to_json() for s in self.scores],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        scores = [Scored.from_json(s) for s in data["scores"]]
        return cls(data["key"], data["prompts"], data["continuations"], scores)


class QualityGuard:
    """One study's probe and reference; thread-safe (parallel trial slots share it)."""

    def __init__(
        self,
        settings: QualitySettings,
        base: DeploymentConfig,
        workload: WorkloadConfig,
        run_dir: Path,
        *,
        startup_timeout_s: float = 180.0,
    ) -> None:
        self.settings = settings
        self.workload = workload
        self.run_dir = run_dir
        self.startup_timeout_s = startup_timeout_s
        self.synthetic = base.model.load_format == "dummy"
        try:
            self.reference_config = base.replace(**settings.reference)
        except ConfigError as err:
            raise ConfigError(f"quality.reference: {err}") from None
        self._reference: Reference | None = None
        self._failure: str | None = None
        self._lock = threading.Lock()

    @property
    def cache_path(self) -> Path:
        return self.run_dir / "quality" / "reference.json"

    def bounds(self) -> list[tuple[str, str, float]]:
        return self.settings.bounds(synthetic=self.synthetic)

    def key(self) -> str:
        """What the cached reference depends on: the probe settings, the reference, the workload."""
        bounds = ("min_token_agreement", "max_mean_kl", "max_perplexity_ratio", "enforce_on_dummy_weights")
        settings = {k: v for k, v in asdict(self.settings).items() if k not in bounds}
        reference = self.settings.reference_url or self.reference_config.to_flat()
        blob = json.dumps([settings, reference, asdict(self.workload)], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def prepare(self) -> Reference:
        """The reference's answers: from the cache when it matches, else computed now and cached."""
        with self._lock:
            if self._failure is not None:
                raise RuntimeError(f"the quality reference could not be computed: {self._failure}")
            if self._reference is None:
                try:
                    self._reference = self._load() or self._compute()
                except Exception as err:
                    self._failure = f"{type(err).__name__}: {err}"
                    raise
            return self._reference

    def ready(self) -> None:
        """prepare(), its failure kept for the probes to report (a trial still measures its speed)."""
        try:
            self.prepare()
        except Exception as err:
            log.warning("quality reference: %s", err)

    def probe(self, url: str, model: str, trial_dir: Path) -> dict[str, float]:
        """Score a running deployment: quality_* metrics (only quality_synthetic when the probe failed: the
        reason is in quality.json)."""
        out: dict[str, Any] = {"synthetic": self.synthetic}
        metrics: dict[str, float] = {"quality_synthetic": float(self.synthetic)}
        try:
            reference = self.prepare()
            client = ProbeClient(url, model)
            try:
                scores = [client.score(p + c, self.settings.top_logprobs) for p, c in _pairs(reference)]
            finally:
                client.close()
            lens = [len(c) for c in reference.continuations]
            metrics.update(compare(reference.scores, scores, lens).metrics())
            if self.synthetic:
                metrics.pop("quality_perplexity", None)
                metrics.pop("quality_perplexity_ratio", None)
            out["metrics"] = metrics
        except Exception as err:  # a failed probe must not fail the study: the bounds then reject the trial
            out["error"] = f"{type(err).__name__}: {err}"
            log.warning("quality probe failed: %s", out["error"])
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "quality.json").write_text(json.dumps(out, indent=1))
        return metrics

    # --- the reference ---------------------------------------------------------------------------

    def _load(self) -> Reference | None:
        try:
            cached = Reference.from_json(json.loads(self.cache_path.read_text()))
        except (OSError, ValueError, KeyError):
            return None
        return cached if cached.key == self.key() else None

    def _compute(self) -> Reference:
        s = self.settings
        with self._reference_server() as (url, model):
            client = ProbeClient(url, model)
            try:
                bodies = probe_texts(self.workload, self.reference_config.model.path, s.num_prompts, s.seed)
                prompts = [client.tokenize(body)[: s.max_prompt_tokens] for body in bodies]
                continuations = [client.continue_greedy(p, s.max_tokens) for p in prompts]
                scores = [
                    client.score(p + c, s.top_logprobs) for p, c in zip(prompts, continuations, strict=True)
                ]
            finally:
                client.close()
        reference = Reference(self.key(), prompts, continuations, scores)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        self.cache_path.write_text(json.dumps(reference.to_json()))
        return reference

    @contextmanager
    def _reference_server(self) -> Iterator[tuple[str, str]]:
        """The user's reference URL, or the reference deployment launched for as long as it is needed."""
        if self.settings.reference_url:
            yield self.settings.reference_url, self.reference_config.model.name
            return
        from serving.launch import ServerProcess

        config = self.reference_config.replace(**{"server.port": 0})
        log_path = self.cache_path.parent / "reference-server.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        server = ServerProcess(config, log_path=log_path)
        try:
            server.start()
            server.wait_healthy(self.startup_timeout_s)
            yield server.url, config.model.name
        finally:
            server.stop()


def _pairs(reference: Reference) -> Iterator[tuple[list[int], list[int]]]:
    return zip(reference.prompts, reference.continuations, strict=True)


def build_guard(
    settings: QualitySettings,
    base: DeploymentConfig,
    workload: WorkloadConfig,
    run_dir: Path,
    startup_timeout_s: float,
) -> QualityGuard | None:
    """The study's guard, or None when quality.enabled is false."""
    if not settings.enabled:
        return None
    return QualityGuard(settings, base, workload, run_dir, startup_timeout_s=startup_timeout_s)
