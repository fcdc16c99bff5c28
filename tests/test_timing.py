"""runtime.timing: the round-robin helper the benchmarks and the demo share (order and retries, not speed)."""
import math

import pytest

from mambaprune.runtime import timing


def test_variants_are_called_round_robin_after_the_warmup_rounds():
    order = []
    result = timing.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=2)
    assert order == ["a", "b"] * 5
    assert set(result.ms) == {"a", "b"} and all(ms >= 0 for ms in result.ms.values())
    assert result.attempts == 1


def test_a_burst_repeats_a_call_until_it_fills_its_time():
    calls = []
    timing.burst_ms(lambda: calls.append(1), fill_ms=1e-9, sync=lambda: None)
    assert len(calls) >= 1
    calls.clear()
    timing.round_robin({"a": lambda: calls.append(1)}, rounds=2, warmup=0, fill_ms=0.0)
    assert len(calls) == 2  # without a burst: one call per round


def test_a_busy_block_is_measured_again_and_its_share_reported(monkeypatch):
    # each block: the machine busy for 10 s more than this process, within ~0 s of wall time
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(timing, "busy_seconds", lambda: (float(next(clock)), 0.0))
    monkeypatch.setattr(timing, "others_share", lambda before, after, wall: (after[0] - before[0]) / 20)
    sleeps = []
    monkeypatch.setattr(timing.time, "sleep", sleeps.append)
    result = timing.interleaved({"a": lambda: None}, rounds=1, attempts=3, others_max=0.1, wait_s=7.0)
    assert result.attempts == 3 and result.others_cpu_share == 0.5
    assert sleeps == [7.0, 7.0]


def test_an_unknown_share_is_not_retried(monkeypatch):
    monkeypatch.setattr(timing, "busy_seconds", lambda: (math.nan, 0.0))
    result = timing.interleaved({"a": lambda: None}, rounds=1, attempts=3)
    assert result.attempts == 1 and math.isnan(result.others_cpu_share)


def test_others_share_is_the_time_not_spent_by_this_process():
    assert timing.others_share((10.0, 1.0), (14.0, 2.0), wall_s=1.0) == pytest.approx(3.0 / timing.os.cpu_count())
    assert timing.others_share((10.0, 1.0), (10.5, 2.0), wall_s=1.0) == 0.0


def test_at_least_one_round_is_required():
    with pytest.raises(ValueError, match="rounds"):
        timing.interleaved({"a": lambda: None}, rounds=0)
