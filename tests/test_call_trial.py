"""A close race is settled by timing whole calls of a long run (#30).

The trial only changes which engine runs: every map stays equal to the dense engine's.
"""

import torch

from extra_attrib import TiledOcclusion
from extra_attrib import _call_trial as call_trial
from extra_attrib._call_trial import CLOSE_MARGIN, MIN_CALLS_AFTER, TRIAL_CALLS, CallTrial
from extra_attrib._run_hint import expected_calls
from tests.test_groups import WINDOW, K, _budget_for, _error, net  # noqa: F401 (fixture)


def test_a_clear_race_or_a_short_run_starts_no_trial():
    assert CallTrial.after_race("dense", CLOSE_MARGIN, 100) is None
    assert CallTrial.after_race("dense", 1.0, MIN_CALLS_AFTER - 1) is None
    assert CallTrial.after_race("incremental", None, 100) is None  # no race ran


def test_the_trial_alternates_starting_with_the_engine_the_race_rejected():
    trial = CallTrial.after_race("incremental", 1.1, MIN_CALLS_AFTER)
    assert trial.pending == ["dense", "incremental"] * (TRIAL_CALLS // 2)
    assert trial.next_engine() == "dense"


def test_the_faster_whole_call_per_example_wins_even_against_the_race():
    trial = CallTrial.after_race("dense", 1.05, 31)
    for engine, seconds, examples in [
        ("incremental", 0.9, 3),  # 0.30 per example
        ("dense", 0.7, 2),  # 0.35
        ("incremental", 0.64, 2),  # 0.32
        ("dense", 1.2, 3),  # 0.40
    ]:
        assert trial.running and trial.next_engine() == engine
        trial.record(engine, seconds, examples)
    assert not trial.running
    assert trial.kept == "incremental" and trial.next_engine() == "incremental"
    assert "incremental took 0.86x the time of dense per example" in trial.verdict


def test_a_call_that_fell_back_is_not_timed_for_the_engine_it_did_not_run():
    trial = CallTrial.after_race("dense", 1.05, 31)
    trial.record("dense", 0.1, 1)  # asked incremental, which fell back to dense
    for engine in ["dense", "incremental", "dense"]:
        trial.record(engine, 1.0, 1)
    assert trial.kept == "dense"  # the race's winner on a tie
    assert trial.seconds == {"dense": [1.0, 1.0], "incremental": [1.0]}

    untimed = CallTrial.after_race("dense", 1.05, 31)
    for _ in range(TRIAL_CALLS):
        untimed.record("dense", 1.0, 1)
    assert untimed.kept == "dense" and "did not time both" in untimed.verdict


def test_a_long_run_after_a_close_race_times_both_engines_and_stays_exact(
    net,  # noqa: F811
    flops_only,
    monkeypatch,
):
    monkeypatch.setattr(call_trial, "CLOSE_MARGIN", float("inf"))  # every race is close
    torch.manual_seed(0)
    xs = torch.randn(MIN_CALLS_AFTER + 3, 1, 3, 32, 32, dtype=torch.float64)
    reference = TiledOcclusion(net)
    tiled = TiledOcclusion(net)
    ran = []
    for i, x in enumerate(xs):
        dense = reference.attribute(x, target=1, window=WINDOW, k=K, engine="dense")
        with expected_calls(len(xs) - i):
            auto = tiled.attribute(x, target=1, window=WINDOW, k=K)
        assert _error(auto, dense) <= 1e-10
        ran.append((tiled.last_engine, tiled.last_engine_reason))
    raced = ran[0][0]
    other = "incremental" if raced == "dense" else "dense"
    assert "measured on this sweep's windows" in ran[0][1]
    assert [e for e, _ in ran[1 : 1 + TRIAL_CALLS]] == [other, raced] * (TRIAL_CALLS // 2)
    assert all("timed on a whole call" in why for _, why in ran[1 : 1 + TRIAL_CALLS])
    kept = tiled._trials[next(iter(tiled._trials))].kept
    assert {e for e, _ in ran[1 + TRIAL_CALLS :]} == {kept}
    assert all(
        "timed on whole calls after a close race" in why for _, why in ran[2 + TRIAL_CALLS :]
    )


def test_a_short_run_and_engine_incremental_never_trial(net, flops_only, monkeypatch):  # noqa: F811
    monkeypatch.setattr(call_trial, "CLOSE_MARGIN", float("inf"))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    short = TiledOcclusion(net)
    with expected_calls(MIN_CALLS_AFTER):  # one call short of a trial
        short.attribute(x, target=1, window=WINDOW, k=K)
    assert short._trials == {}
    forced = TiledOcclusion(net)
    for _ in range(3):
        with expected_calls(100):
            forced.attribute(x, target=1, window=WINDOW, k=K, engine="incremental")
        assert forced.last_engine == "incremental"
    assert forced._trials == {}


def test_the_groups_of_a_large_batch_count_as_calls_of_the_trial(net, flops_only, monkeypatch):  # noqa: F811
    monkeypatch.setattr(call_trial, "CLOSE_MARGIN", float("inf"))
    x = torch.randn(2 * (MIN_CALLS_AFTER + 2), 3, 32, 32, dtype=torch.float64)
    tiled = TiledOcclusion(net)
    dense = tiled.attribute(x, target=1, window=WINDOW, k=K, engine="dense")
    auto = tiled.attribute(x, target=1, window=WINDOW, k=K, memory_budget=_budget_for(net, x, 2))
    assert f"{MIN_CALLS_AFTER + 2} groups of at most 2" in tiled.last_engine_reason
    assert _error(auto, dense) <= 1e-10
    (trial,) = tiled._trials.values()
    assert not trial.running and trial.verdict.startswith("timed on whole calls")


def test_a_settled_trial_outranks_the_race_of_another_batch_size(net, flops_only, monkeypatch):  # noqa: F811
    # The race ran on a batch of 2, the trial on batches of 1: a later batch of 2 follows the
    # trial, not its own race. The trial is made to keep the engine the race rejected.
    monkeypatch.setattr(call_trial, "CLOSE_MARGIN", float("inf"))
    monkeypatch.setattr(
        CallTrial, "kept", property(lambda t: "incremental" if t.raced == "dense" else "dense")
    )
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    dense = TiledOcclusion(net).attribute(x, target=1, window=WINDOW, k=K, engine="dense")
    tiled = TiledOcclusion(net)
    with expected_calls(100):
        tiled.attribute(x, target=1, window=WINDOW, k=K)
    raced = tiled.last_engine
    for _ in range(TRIAL_CALLS):
        with expected_calls(100):
            tiled.attribute(x[:1], target=1, window=WINDOW, k=K)
    with expected_calls(100):
        auto = tiled.attribute(x, target=1, window=WINDOW, k=K)
    assert tiled.last_engine != raced
    assert "timed on whole calls" in tiled.last_engine_reason
    assert _error(auto, dense) <= 1e-10
