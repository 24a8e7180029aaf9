"""Config claims in the study's database: exactly one trial measures a deployment, even when two workers
sample it at the same moment; an interrupted measurement hands the claim over once."""

from __future__ import annotations

import threading
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autotune.report import results as R
from autotune.study.claims import ConfigClaims
from autotune.study.loop import StudyLoop, config_key
from autotune.study.storage import open_study
from tests.autotune.test_study import ONE_CONFIG, context


def test_first_claim_wins_and_later_ones_learn_the_holder(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    claims, other_study = ConfigClaims(url, "a"), ConfigClaims(url, "b")
    assert claims.claim("k", 3) is None
    assert claims.claim("k", 3) is None  # the holder asking again keeps it
    assert claims.claim("k", 7) == 3
    assert other_study.claim("k", 7) is None  # claims are per study
    assert claims.hand_over("k", holder=5, trial_number=7) is False  # 5 does not hold it
    assert claims.hand_over("k", holder=3, trial_number=7) is True
    assert claims.holder("k") == 7


def test_racing_threads_on_one_config_leave_exactly_one_winner(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    ConfigClaims(url, "race").close()  # the table exists before the race, as after the first worker
    start = threading.Barrier(8)
    results: dict[int, int | None] = {}

    def contender(number: int) -> None:
        claims = ConfigClaims(url, "race")
        start.wait()
        results[number] = claims.claim("same-config", number)
        claims.close()

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, holder in results.items() if holder is None]
    assert len(winners) == 1
    assert all(holder == winners[0] for n, holder in results.items() if n != winners[0])


def test_a_config_claimed_by_a_running_trial_is_not_launched_again(tmp_path: Path) -> None:
    """The old race: worker A claimed the config but its attrs are not visible yet when B samples it."""
    ctx = context(tmp_path, ONE_CONFIG)
    study = open_study(ctx)
    running = study.ask()  # worker A's trial 0: RUNNING, no config key written yet
    running.suggest_categorical("scheduler.policy", ["continuous"])
    config = ctx.space.deployment(ctx.base, {"scheduler.policy": "continuous"})
    ConfigClaims(ctx.storage_url, ctx.name).claim(config_key(config), running.number)

    loop = StudyLoop(ctx, study)
    assert loop.step() is False  # no server launched for trial 1
    second = study.trials[1]
    assert second.state == TrialState.PRUNED and second.user_attrs[R.REPEAT_OF] == 0
    assert "being measured by trial 0" in second.user_attrs[R.REASON]


def test_an_interrupted_holder_hands_its_config_to_the_requeued_trial(tmp_path: Path) -> None:
    ctx = context(tmp_path, ONE_CONFIG)
    study = open_study(ctx)
    interrupted = study.ask()
    interrupted.suggest_categorical("scheduler.policy", ["continuous"])
    config = ctx.space.deployment(ctx.base, {"scheduler.policy": "continuous"})
    key = config_key(config)
    interrupted.set_user_attr(R.CONFIG_KEY, key)
    interrupted.set_user_attr(R.RETRYABLE, True)
    study.tell(interrupted, state=TrialState.FAIL)
    claims = ConfigClaims(ctx.storage_url, ctx.name)
    assert claims.claim(key, interrupted.number) is None

    loop = StudyLoop(ctx, study)
    assert loop.workers.claim(key, 1) is None  # the interrupted trial's claim is taken over
    assert claims.holder(key) == 1
    assert optuna.load_study(study_name=ctx.name, storage=ctx.storage_url).trials[0].state == TrialState.FAIL
