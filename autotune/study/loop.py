"""The study loop: Optuna ask/tell over the search space, one real launch per new configuration.

Per ask: sample the space -> build the DeploymentConfig (a bad combination is pruned) -> reuse the result
of an earlier trial with the same deployment (never measure twice) -> pre-launch checks and the memory
planner (pruned with the reason) -> claim the config in the study's database (of two workers that sampled
it at once, one measures) -> wait for free devices -> launch and benchmark -> tell values and constraints.

With `study.parallel_trials` > 1 that sequence runs in as many threads, each trial on the disjoint devices
the DevicePool hands it; Ctrl-C (or SIGTERM) stops every running trial and records them as interrupted.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autotune.report import results as R
from autotune.report.results import TrialRecord, load_records
from autotune.study.context import StudyContext
from autotune.study.front_gate import front_gate
from autotune.study.observer import StudyObserver
from autotune.study.warm_start import study_ranking, warm_points
from autotune.study.workers import FINISHED, Workers
from autotune.trial.device_pool import Allocation, DevicePool
from autotune.trial.runner import TrialCancelled, TrialOutcome, run_trial
from serving.config import ConfigError, DeploymentConfig


def config_key(config: DeploymentConfig) -> str:
    """Identity of a deployment for the repeat check: every field except where it listens."""
    flat = {k: v for k, v in config.to_flat().items() if not k.startswith("server.port")}
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StudyLoop:
    """Runs trials until `study.n_trials` configurations have been measured (resumed ones included)."""

    def __init__(
        self,
        ctx: StudyContext,
        study: optuna.Study,
        observers: Sequence[StudyObserver] = (),
        cancel: threading.Event | None = None,
    ):
        self.ctx = ctx
        self.study = study
        self.observers = list(observers)
        self.traffic = ctx.traffic
        self.slots = ctx.settings.study.parallel_trials
        self.pool = DevicePool(ctx.devices, self.slots, ctx.settings.trial.server_cpus)
        study_settings = ctx.settings.study
        self.workers = Workers(study, ctx.storage_url, study_settings.n_trials, study_settings.heartbeat_s)
        self.cancel = cancel or threading.Event()
        """Set on Ctrl-C / SIGTERM (or a crashed slot): every running trial stops and is recorded."""
        self._lock = threading.RLock()
        """Serialises observers and the loop's counters across trial threads."""
        self._in_flight = 0
        self._idle = 0
        self._exhausted = False
        self._errors: list[BaseException] = []

    # --- bookkeeping -----------------------------------------------------------------------------

    def measured(self) -> int:
        return self.workers.measured()

    def budget_used(self) -> int:
        """Measured configs, plus ours in flight, plus other workers' trials being measured right now."""
        return self.workers.measured() + self._in_flight + self.workers.running_elsewhere()

    def enqueue_seeds(self) -> None:
        """Seed configurations go first, then the warm start's best predicted (`study.warm_start`), once
        per study (enqueue skips ones already there)."""
        seeds = self.ctx.space.seeds
        count = self.ctx.settings.study.warm_start
        warm = warm_points([p for p, _ in study_ranking(self.ctx)], count, seeds) if count else []
        for params in (*seeds, *warm):
            self.study.enqueue_trial(dict(params), skip_if_exists=True)

    def earlier_result(self, key: str, number: int) -> FrozenTrial | None:
        """A finished (or running) trial with the same deployment; COMPLETE preferred."""
        same = [
            t
            for t in self.study.get_trials(deepcopy=False)
            if t.number != number
            and t.user_attrs.get(R.CONFIG_KEY) == key
            and t.user_attrs.get(R.REPEAT_OF) is None
            and not t.user_attrs.get(R.RETRYABLE)
            and t.state in (*FINISHED, TrialState.RUNNING)
        ]
        same.sort(key=lambda t: (t.state != TrialState.COMPLETE, t.state == TrialState.RUNNING, t.number))
        return same[0] if same else None

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> list[TrialRecord]:
        total = self.ctx.settings.study.n_trials
        self.workers.fail_orphans()
        self.workers.requeue_interrupted()  # also the ones a Ctrl-C left for this run
        self.enqueue_seeds()
        for o in self.observers:
            o.study_started(self.ctx.name, total, load_records(self.study))
        self.workers.start_heartbeats()
        try:
            if self.slots == 1:
                self.work()
            else:
                self._run_slots()
            if self.cancel.is_set():  # a signal whose KeyboardInterrupt was swallowed on the way
                raise KeyboardInterrupt
        finally:
            self.workers.close()
            records = load_records(self.study)
            for o in self.observers:
                o.study_finished(records)
        return records

    def work(self) -> None:
        """Ask, check and measure until the budget is reached (the main thread, or one trial slot)."""
        total = self.ctx.settings.study.n_trials
        told_waiting = False
        while not self.cancel.is_set():
            with self._lock:
                self.workers.recover()
                ours = self.workers.measured() + self._in_flight
                if self._exhausted or ours >= total:
                    return
                others = ours + self.workers.running_elsewhere() >= total
                if not others:
                    self._in_flight += 1
            if others:  # the rest is being measured by other workers: stay to retry it if one dies
                if not told_waiting:
                    print(
                        "autotune: waiting for trials running on other workers (a dead one's is retried here)"
                    )
                    told_waiting = True
                self.cancel.wait(min(5.0, self.ctx.settings.study.heartbeat_s))
                continue
            launched = False
            try:
                launched = self.step()
            except optuna.exceptions.UpdateFinishedTrialError as err:
                print(f"autotune: another worker failed a trial of ours as silent; result dropped ({err})")
            finally:
                with self._lock:
                    self._in_flight -= 1
                    self._idle = 0 if launched else self._idle + 1
                    if self._idle >= self.ctx.settings.study.max_repeats and not self._exhausted:
                        self._exhausted = True
                        print(
                            f"autotune: {self._idle} samples in a row needed no launch (repeats or pruned): "
                            "the space looks exhausted; stopping"
                        )

    def _run_slots(self) -> None:
        """`parallel_trials` threads run work(); the main thread keeps SIGINT and cancels them on it."""
        threads = [
            threading.Thread(target=self._slot, name=f"trial-slot-{i}", daemon=True)
            for i in range(self.slots)
        ]
        for thread in threads:
            thread.start()
        try:
            _join(threads)
        except KeyboardInterrupt:
            self.cancel.set()
            print("\nautotune: stopping the running trials ...", file=sys.stderr)
            while True:
                try:
                    _join(threads)
                    break
                except KeyboardInterrupt:
                    continue  # servers are being stopped; leaving now would orphan them
            raise
        if self._errors:
            raise self._errors[0]

    def _slot(self) -> None:
        try:
            self.work()
        except KeyboardInterrupt:  # TrialCancelled: the trial is already recorded as interrupted
            pass
        except BaseException as err:  # a storage or observer failure: stop the other slots, re-raise
            self._errors.append(err)
            self.cancel.set()

    def step(self) -> bool:
        """One ask/tell; True when a server was launched."""
        trial = self.study.ask()
        with self.workers.owning(trial):
            return self._step(trial)

    def _step(self, trial: optuna.Trial) -> bool:
        params = self.ctx.space.suggest(trial)
        try:
            config = self.ctx.space.deployment(self.ctx.base, params)
        except ConfigError as err:
            self._prune(trial, f"invalid combination: {err}")
            return False
        key = config_key(config)
        trial.set_user_attr(R.CONFIG_KEY, key)
        trial.set_user_attr(R.DEPLOYMENT, config.to_flat())
        earlier = self.earlier_result(key, trial.number)
        if earlier is not None:
            self._repeat(trial, earlier)
            return False
        reason, _plan = self.ctx.check(config)
        if reason:
            self._prune(trial, reason)
            return False
        if self.workers.budget_taken(trial.number):
            total = self.ctx.settings.study.n_trials
            self._prune(trial, f"budget: study.n_trials={total} taken by trials measured or asked earlier")
            return False
        holder = self.workers.claim(key, trial.number)
        if holder is not None:
            self._repeat(trial, holder)
            return False
        allocation = self.pool.acquire(config, self.cancel)
        if allocation is None:  # cancelled while waiting for devices
            self._interrupted(trial)
            raise TrialCancelled("cancelled while waiting for devices")
        try:
            self._measure(trial, config, params, allocation)
        finally:
            self.pool.release(allocation)
        return True

    def _prune(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr(R.REASON, reason)
        self.study.tell(trial, state=TrialState.PRUNED)
        self._finished(trial.number, None)

    def _repeat(self, trial: optuna.Trial, earlier: FrozenTrial) -> None:
        """Reuse the earlier result: same state, values, constraints and metrics; nothing launched."""
        trial.set_user_attr(R.REPEAT_OF, earlier.number)
        if earlier.state == TrialState.RUNNING:
            trial.set_user_attr(R.REASON, f"same deployment is being measured by trial {earlier.number}")
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            for name in (R.METRICS, R.REASON):
                if name in earlier.user_attrs:
                    trial.set_user_attr(name, earlier.user_attrs[name])
            for name, value in earlier.constraints.items():
                trial.set_constraint(name, value)
            if earlier.state == TrialState.COMPLETE:
                self.study.tell(trial, earlier.values)
            else:
                self.study.tell(trial, state=earlier.state)
        self._finished(trial.number, None)

    def _measure(
        self, trial: optuna.Trial, config: DeploymentConfig, params: dict[str, Any], allocation: Allocation
    ) -> None:
        self._notify(lambda o: o.trial_started(trial.number, params))
        trial_dir = self.ctx.run_dir / "trials" / f"{trial.number:04d}"
        trial.set_user_attr(R.TRIAL_DIR, str(trial_dir))
        trial.set_user_attr(R.DEVICES, allocation.describe())
        where = f" on {allocation.describe()}" if self.slots > 1 else ""
        if self.ctx.quality is not None:  # before the trial's server starts: one server at a time
            self._phase(trial.number, "quality reference")
            self.ctx.quality.ready()
        try:
            outcome = run_trial(
                config,
                self.traffic,
                self.ctx.settings.trial,
                trial_dir,
                cpus=list(allocation.cpus),
                extra_env=allocation.env(),
                on_phase=lambda text: self._phase(trial.number, text + where),
                cancel=self.cancel,
                probe=self.ctx.quality.probe if self.ctx.quality else None,
                gate=front_gate(load_records(self.study), self.ctx.objectives),
            )
        except BaseException:
            self._interrupted(trial)
            raise
        trial.set_user_attr(R.MEASURED, True)
        trial.set_user_attr(R.DURATION, outcome.duration_s)
        trial.set_user_attr(R.METRICS, outcome.metrics)
        if outcome.pruned is not None:  # launched, measured in part, and shown not to reach the front
            trial.set_user_attr(R.REASON, outcome.pruned)
            self.study.tell(trial, state=TrialState.PRUNED)
            self._finished(trial.number, outcome)
            return
        if outcome.ok:
            try:
                values = self.ctx.objectives.values(outcome.metrics)
            except (KeyError, ValueError) as err:
                outcome.ok, outcome.reason = False, str(err)
        if outcome.ok:
            for name, value in self.ctx.objectives.constraint_values(outcome.metrics).items():
                trial.set_constraint(name, value)
            self.study.tell(trial, values)
        else:
            retry = outcome.transient and self._retry_once(trial, config_key(config), outcome)
            trial.set_user_attr(R.REASON, outcome.reason)
            self.study.tell(trial, state=TrialState.FAIL)
            if retry:
                with self._lock:
                    self.workers.requeue_interrupted()
        self._finished(trial.number, outcome)

    def _retry_once(self, trial: optuna.Trial, key: str, outcome: TrialOutcome) -> bool:
        """A transient failure (slow start, ports taken) is launched once more, as a retryable trial is;
        a second one stands: a deployment that is always slow to start is slow, not unlucky."""
        trial.set_user_attr(R.TRANSIENT, True)
        earlier = [
            t.number
            for t in self.study.get_trials(deepcopy=False)
            if t.number != trial.number
            and t.user_attrs.get(R.CONFIG_KEY) == key
            and t.user_attrs.get(R.TRANSIENT)
        ]
        if earlier:
            outcome.reason = f"{outcome.reason} (transient again after trial {earlier[0]}'s: not retried)"
            return False
        trial.set_user_attr(R.RETRYABLE, True)
        outcome.reason = f"{outcome.reason} (transient: the configuration is launched once more)"
        return True

    def _interrupted(self, trial: optuna.Trial) -> None:
        """Recorded as a retryable failure: the next run queues the configuration again."""
        trial.set_user_attr(R.REASON, "interrupted")
        trial.set_user_attr(R.RETRYABLE, True)
        self.study.tell(trial, state=TrialState.FAIL)

    def _phase(self, number: int, text: str) -> None:
        self._notify(lambda o: o.phase(number, text))

    def _finished(self, number: int, outcome: TrialOutcome | None) -> None:
        records = load_records(self.study)  # other workers' trials too
        record = records[number]
        self._notify(lambda o: o.trials_seen(records))
        self._notify(lambda o: o.trial_finished(record, outcome))

    def _notify(self, call: Callable[[StudyObserver], None]) -> None:
        with self._lock:
            for o in self.observers:
                call(o)


def _join(threads: Sequence[threading.Thread]) -> None:
    """Wait for every thread, waking twice a second so SIGINT reaches the main thread."""
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.5)
