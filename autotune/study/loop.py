"""The study loop: Optuna ask/tell over the search space, one real launch per new configuration.

Per ask: sample the space -> build the DeploymentConfig (a bad combination is pruned) -> reuse the result
of an earlier trial with the same deployment (never measure twice) -> pre-launch checks and the memory
planner (pruned with the reason) -> claim the config in the study's database (of two workers that sampled
it at once, one measures) -> wait for free devices -> launch and benchmark -> tell values and constraints.

With `study.parallel_trials` > 1 that sequence runs in as many threads, each trial on the disjoint devices
the DevicePool hands it; Ctrl-C (or SIGTERM) stops every running trial and records them as interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autotune.report import results as R
from autotune.report.results import TrialRecord, load_records
from autotune.study.claims import ConfigClaims
from autotune.study.context import StudyContext
from autotune.study.observer import StudyObserver
from autotune.study.samplers import make_sampler
from autotune.trial.device_pool import Allocation, DevicePool
from autotune.trial.runner import TrialCancelled, TrialOutcome, run_trial
from serving.config import ConfigError, DeploymentConfig, flatten

FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


def config_key(config: DeploymentConfig) -> str:
    """Identity of a deployment for the repeat check: every field except where it listens."""
    flat = {k: v for k, v in config.to_flat().items() if not k.startswith("server.port")}
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_study(ctx: StudyContext) -> optuna.Study:
    """Create the study, or load it when the name exists (then the objectives must match)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if ctx.storage_url.startswith("sqlite:///"):
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=ctx.name,
        storage=ctx.storage_url,
        directions=[optuna.study.StudyDirection[d.upper()] for d in ctx.objectives.directions],
        sampler=make_sampler(ctx.settings.study, ctx.space),
        load_if_exists=True,
    )
    names = study.metric_names
    if names is None:
        study.set_metric_names(ctx.objectives.names)
    elif list(names) != ctx.objectives.names:
        raise ValueError(
            f"study {ctx.name!r} in {ctx.storage_url} optimises {list(names)}, not {ctx.objectives.names}: "
            "use another study.name for other objectives"
        )
    _check_traffic(study, ctx)
    return study


TRAFFIC_ATTR = "autotune.traffic"
"""Study user attr: the workload, arrival and SLO every trial of the study was measured under."""


def _check_traffic(study: optuna.Study, ctx: StudyContext) -> None:
    """Results are comparable only under one traffic: a run (or worker) with other traffic is refused."""
    s = ctx.settings
    now = json.loads(
        json.dumps(flatten({"workload": s.workload, "arrival": s.arrival, "slo": s.slo or {}}), default=str)
    )
    stored = study.user_attrs.get(TRAFFIC_ATTR)
    if stored is None:
        study.set_user_attr(TRAFFIC_ATTR, now)
        return
    differ = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    if differ:
        shown = "; ".join(f"{k}={stored.get(k)!r} there, {now.get(k)!r} now" for k in differ[:5])
        raise ValueError(
            f"study {ctx.name!r} in {ctx.storage_url} was measured under other traffic ({shown}): "
            "its results would not be comparable; use the study's overrides, or another study.name"
        )


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's worker: not ours to judge
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


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
        self.traffic = ctx.traffic()
        self.slots = ctx.settings.study.parallel_trials
        self.pool = DevicePool(ctx.devices, self.slots, ctx.settings.trial.server_cpus)
        self.claims = ConfigClaims(ctx.storage_url, ctx.name)
        self.cancel = cancel or threading.Event()
        """Set on Ctrl-C / SIGTERM (or a crashed slot): every running trial stops and is recorded."""
        self._lock = threading.RLock()
        """Serialises observers and the loop's counters across trial threads."""
        self._in_flight = 0
        self._idle = 0
        self._exhausted = False
        self._errors: list[BaseException] = []
        self._beating: set[int] = set()
        """Trial ids of ours that are RUNNING: the heartbeat thread refreshes them."""
        self._stop_heart = threading.Event()
        self._unbeaten: dict[int, float] = {}
        """RUNNING trials of others seen without a heartbeat yet: trial id -> when first seen."""

    # --- bookkeeping -----------------------------------------------------------------------------

    def measured(self) -> int:
        return sum(
            1
            for t in self.study.get_trials(deepcopy=False, states=FINISHED)
            if t.user_attrs.get(R.MEASURED) and not t.user_attrs.get(R.RETRYABLE)
        )

    def budget_used(self) -> int:
        """Measured configs, plus ours in flight, plus other workers' trials being measured right now."""
        return self.measured() + self._in_flight + self._running_elsewhere()

    def _running_elsewhere(self) -> int:
        """Other workers' live RUNNING trials, also ones not yet known to be measured (a repeat ends in
        ms; then a waiting worker goes on)."""
        me = _owner()
        return sum(1 for t in self._live_running() if t.user_attrs.get(R.OWNER) != me)

    def _live_running(self) -> list[FrozenTrial]:
        """RUNNING trials whose worker still beats (any worker's, ours included)."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t for t in running if not self._silent(t)]

    def fail_orphans(self) -> int:
        """RUNNING trials of a dead worker become retryable failures: its process on this host is gone,
        or (any host) its heartbeat stopped 4 x study.heartbeat_s ago. Returns how many."""
        failed = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get(R.OWNER)
            if owner and not _alive(owner):
                reason = "interrupted (process gone)"
            elif self._silent(t):
                reason = (
                    f"interrupted (no heartbeat from {owner or 'its worker'} for {self._silence_s(t):.0f} s)"
                )
            else:
                continue
            try:
                self.study._storage.set_trial_user_attr(t._trial_id, R.REASON, reason)
                self.study._storage.set_trial_user_attr(t._trial_id, R.RETRYABLE, True)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed += 1
        return failed

    def recover(self) -> None:
        """Retry what dead workers left RUNNING; checked before every trial, not only at start-up."""
        if self.fail_orphans():
            self.requeue_interrupted()

    def _silent(self, trial: FrozenTrial) -> bool:
        return self._silence_s(trial) > 4 * self.ctx.settings.study.heartbeat_s

    def _silence_s(self, trial: FrozenTrial) -> float:
        """Seconds since the trial's last heartbeat. One without any (its worker died right after asking)
        counts from when this worker first saw it: Optuna's start times are naive local clock times."""
        beat = trial.user_attrs.get(R.HEARTBEAT)
        if beat is not None:
            return time.time() - float(beat)
        first_seen = self._unbeaten.setdefault(trial._trial_id, time.time())
        return time.time() - first_seen

    def _heartbeat(self) -> None:
        """Heartbeat thread: refresh every running trial of ours, so other workers know we are alive."""
        interval = self.ctx.settings.study.heartbeat_s
        while not self._stop_heart.wait(interval):
            with self._lock:
                beating = list(self._beating)
            for trial_id in beating:
                # a finished trial needs no beat; a locked or unreachable database gets the next one
                with contextlib.suppress(Exception):
                    self.study._storage.set_trial_user_attr(trial_id, R.HEARTBEAT, time.time())

    def enqueue_seeds(self) -> None:
        """Seed configurations go first, once per study (enqueue skips ones already there)."""
        for seed in self.ctx.space.seeds:
            self.study.enqueue_trial(dict(seed), skip_if_exists=True)

    def requeue_interrupted(self) -> None:
        """Configurations whose measurement was interrupted are queued again (once, until measured)."""
        trials = self.study.get_trials(deepcopy=False)
        measured = {
            t.user_attrs.get(R.CONFIG_KEY)
            for t in trials
            if t.state in FINISHED and not t.user_attrs.get(R.RETRYABLE)
        }
        waiting = [t.system_attrs.get("fixed_params") for t in trials if t.state == TrialState.WAITING]
        for t in trials:
            key = t.user_attrs.get(R.CONFIG_KEY)
            if t.user_attrs.get(R.RETRYABLE) and key not in measured and t.params not in waiting:
                self.study.enqueue_trial(dict(t.params))
                waiting.append(dict(t.params))
                measured.add(key)

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
        self.fail_orphans()
        self.requeue_interrupted()  # also the ones a Ctrl-C left for this run
        self.enqueue_seeds()
        for o in self.observers:
            o.study_started(self.ctx.name, total, load_records(self.study))
        heart = threading.Thread(target=self._heartbeat, name="trial-heartbeat", daemon=True)
        heart.start()
        try:
            if self.slots == 1:
                self.work()
            else:
                self._run_slots()
            if self.cancel.is_set():  # a signal whose KeyboardInterrupt was swallowed on the way
                raise KeyboardInterrupt
        finally:
            self._stop_heart.set()
            records = load_records(self.study)
            for o in self.observers:
                o.study_finished(records)
            self.claims.close()
        return records

    def work(self) -> None:
        """Ask, check and measure until the budget is reached (the main thread, or one trial slot)."""
        total = self.ctx.settings.study.n_trials
        told_waiting = False
        while not self.cancel.is_set():
            with self._lock:
                self.recover()
                ours = self.measured() + self._in_flight
                if self._exhausted or ours >= total:
                    return
                others = ours + self._running_elsewhere() >= total
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
        trial.set_user_attr(R.OWNER, _owner())
        trial.set_user_attr(R.HEARTBEAT, time.time())
        with self._lock:
            self._beating.add(trial._trial_id)
        try:
            return self._step(trial)
        finally:
            with self._lock:
                self._beating.discard(trial._trial_id)

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
        if self._budget_taken(trial.number):
            total = self.ctx.settings.study.n_trials
            self._prune(trial, f"budget: study.n_trials={total} taken by trials measured or asked earlier")
            return False
        holder = self._claim(key, trial.number)
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

    def _budget_taken(self, number: int) -> bool:
        """Workers that read the budget at the same moment both ask; then the later trial (by number,
        which the database assigns in order) yields, so the study measures exactly study.n_trials."""
        ahead = sum(1 for t in self._live_running() if t.number < number)
        return self.measured() + ahead >= self.ctx.settings.study.n_trials

    def _claim(self, key: str, number: int) -> FrozenTrial | None:
        """Claim `key` for trial `number`; the trial that holds it instead (None: ours to measure)."""
        holder = self.claims.claim(key, number)
        while holder is not None:
            held = self.study.get_trials(deepcopy=False)[holder]
            if not held.user_attrs.get(R.RETRYABLE):
                return held
            if self.claims.hand_over(key, holder, number):  # its measurement was interrupted: ours now
                return None
            holder = self.claims.claim(key, number)
        return None

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
            )
        except BaseException:
            self._interrupted(trial)
            raise
        trial.set_user_attr(R.MEASURED, True)
        trial.set_user_attr(R.DURATION, outcome.duration_s)
        trial.set_user_attr(R.METRICS, outcome.metrics)
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
            trial.set_user_attr(R.REASON, outcome.reason)
            self.study.tell(trial, state=TrialState.FAIL)
        self._finished(trial.number, outcome)

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
