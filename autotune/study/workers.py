"""Workers: this process among the others measuring one shared study (other threads, processes, machines).

What they share is the study's database: who owns each RUNNING trial and when it last beat, which trial
holds each deployment (claims), and how much of `study.n_trials` is taken. From it this worker decides
what budget is left, which trials a dead worker left behind (retried: failed as retryable, queued again),
and whether a deployment it sampled is already someone else's to measure.

Why not Optuna's own heartbeat (RDBStorage(heartbeat_interval=...), fail_stale_trials,
RetryFailedTrialCallback): its heartbeat thread runs only inside `study.optimize`, not for ask/tell trials;
fail_stale_trials fails a trial before any callback runs, so the trial's reason and retry marker (user
attributes, frozen once a trial is finished) cannot be recorded on it; and a worker that died before its
first beat is never stale there. Optuna has no public call to annotate another worker's RUNNING trial,
so `_set_attr` is the one place that uses its storage by trial id.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from autotune.report import results as R
from autotune.study.claims import ConfigClaims

FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
SILENT_BEATS = 4
"""A RUNNING trial whose worker missed this many heartbeats is taken as dead."""


def owner_id() -> str:
    """This process, as other workers see it: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool:
    """False only for a worker of this host whose process is gone; other hosts are judged by heartbeat."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


class Workers:
    """This worker's view of a shared study: budget, heartbeats, dead workers' trials and config claims."""

    def __init__(self, study: optuna.Study, storage_url: str, n_trials: int, heartbeat_s: float) -> None:
        self.study = study
        self.n_trials = n_trials
        self.heartbeat_s = heartbeat_s
        self.me = owner_id()
        self.claims = ConfigClaims(storage_url, study.study_name)
        self._lock = threading.Lock()
        self._beating: set[int] = set()
        """Trial ids of ours that are RUNNING: the heartbeat thread refreshes them."""
        self._stop_heart = threading.Event()
        self._heart: threading.Thread | None = None
        self._unbeaten: dict[int, float] = {}
        """RUNNING trials of others seen without a heartbeat yet: trial id -> when first seen."""

    # --- budget ----------------------------------------------------------------------------------

    def measured(self) -> int:
        """Configurations measured to the end (a retryable failure will be measured again)."""
        return sum(
            1
            for t in self.study.get_trials(deepcopy=False, states=FINISHED)
            if t.user_attrs.get(R.MEASURED) and not t.user_attrs.get(R.RETRYABLE)
        )

    def running_elsewhere(self) -> int:
        """Other workers' live RUNNING trials, also ones not yet known to be measured (a repeat ends in
        ms; then a waiting worker goes on)."""
        return sum(1 for t in self.live_running() if t.user_attrs.get(R.OWNER) != self.me)

    def live_running(self) -> list[FrozenTrial]:
        """RUNNING trials whose worker still beats (any worker's, ours included)."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t for t in running if not self._silent(t)]

    def budget_taken(self, number: int) -> bool:
        """Workers that read the budget at the same moment both ask; then the later trial (by number,
        which the database assigns in order) yields, so the study measures exactly study.n_trials."""
        ahead = sum(1 for t in self.live_running() if t.number < number)
        return self.measured() + ahead >= self.n_trials

    # --- dead workers ------------------------------------------------------------------------------

    def fail_orphans(self) -> int:
        """RUNNING trials of a dead worker become retryable failures: its process on this host is gone,
        or (any host) its heartbeat stopped SILENT_BEATS x study.heartbeat_s ago. Returns how many."""
        failed = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get(R.OWNER)
            if owner and not owner_alive(owner):
                reason = "interrupted (process gone)"
            elif self._silent(t):
                reason = (
                    f"interrupted (no heartbeat from {owner or 'its worker'} for {self._silence_s(t):.0f} s)"
                )
            else:
                continue
            try:
                self._set_attr(t._trial_id, R.REASON, reason)
                self._set_attr(t._trial_id, R.RETRYABLE, True)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed += 1
        return failed

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

    def recover(self) -> None:
        """Retry what dead workers left RUNNING; checked before every trial, not only at start-up."""
        if self.fail_orphans():
            self.requeue_interrupted()

    def _silent(self, trial: FrozenTrial) -> bool:
        return self._silence_s(trial) > SILENT_BEATS * self.heartbeat_s

    def _silence_s(self, trial: FrozenTrial) -> float:
        """Seconds since the trial's last heartbeat. One without any (its worker died right after asking)
        counts from when this worker first saw it: Optuna's start times are naive local clock times."""
        beat = trial.user_attrs.get(R.HEARTBEAT)
        if beat is not None:
            return time.time() - float(beat)
        first_seen = self._unbeaten.setdefault(trial._trial_id, time.time())
        return time.time() - first_seen

    # --- heartbeats ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def owning(self, trial: optuna.Trial) -> Iterator[None]:
        """Mark a trial as ours and keep it beating while the block runs."""
        trial.set_user_attr(R.OWNER, self.me)
        trial.set_user_attr(R.HEARTBEAT, time.time())
        with self._lock:
            self._beating.add(trial._trial_id)
        try:
            yield
        finally:
            with self._lock:
                self._beating.discard(trial._trial_id)

    def start_heartbeats(self) -> None:
        self._stop_heart.clear()
        self._heart = threading.Thread(target=self._heartbeat, name="trial-heartbeat", daemon=True)
        self._heart.start()

    def stop_heartbeats(self) -> None:
        self._stop_heart.set()
        if self._heart is not None:
            self._heart.join()

    def _heartbeat(self) -> None:
        """Refresh every running trial of ours, so other workers know we are alive."""
        while not self._stop_heart.wait(self.heartbeat_s):
            with self._lock:
                beating = list(self._beating)
            for trial_id in beating:
                # a finished trial needs no beat; a locked or unreachable database gets the next one
                with contextlib.suppress(Exception):
                    self._set_attr(trial_id, R.HEARTBEAT, time.time())

    def _set_attr(self, trial_id: int, key: str, value: object) -> None:
        """A user attribute by trial id, from a thread that does not hold the trial, or on a trial another
        worker asked (Optuna has no public call for either)."""
        self.study._storage.set_trial_user_attr(trial_id, key, value)

    # --- claims --------------------------------------------------------------------------------------

    def claim(self, key: str, number: int) -> FrozenTrial | None:
        """Claim deployment `key` for trial `number`; the trial that holds it instead (None: ours)."""
        holder = self.claims.claim(key, number)
        while holder is not None:
            held = self.study.get_trials(deepcopy=False)[holder]
            if not held.user_attrs.get(R.RETRYABLE):
                return held
            if self.claims.hand_over(key, holder, number):  # its measurement was interrupted: ours now
                return None
            holder = self.claims.claim(key, number)
        return None

    def close(self) -> None:
        self.stop_heartbeats()
        self.claims.close()
