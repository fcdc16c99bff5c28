"""benchmarks/recovery.py's own logic: which training-free setting it starts from, and its table."""
from mambaprune.settings import Alignment

from benchmark_modules import load_benchmark

recovery = load_benchmark("recovery")


def test_it_starts_from_the_best_recorded_training_free_setting():
    best = recovery.best_training_free("vim_digits", 0.3)
    assert best["accuracy"] == max(r["accuracy"] for r in recovery.json.loads(
        (recovery.RESULTS / "fidelity_vim_digits.json").read_text())["rows"] if r["ratio"] == 0.3 and "accuracy" in r)
    settings = recovery.settings_of({"ratio": 0.5, "schedule": "auto, alignment auto", "alignment": "auto",
                                     "metric": "novelty"})
    assert settings.schedule == "auto" and settings.alignment is Alignment.AUTO and settings.needs_calibration
    assert recovery.settings_of({"ratio": 0.3, "schedule": "paper", "alignment": "none", "metric": "novelty"}).schedule is None


def test_the_table_marks_the_steps_that_were_not_run():
    point = {"steps": 0, "seconds": 0.0, "accuracy": 0.9, "agreement": 0.91, "kl": 0.1}
    row = {"model": "vim_digits", "ratio": 0.3, "method": "distill", "achieved": 0.301, "lr": 3e-4, "temperature": 1.0,
           "dense": {"accuracy": 0.958}, "training_free": point, "start": {"alignment": "none"}, "command": "python x",
           "steps": 300, "batch_size": 32,
           "points": [{**point, "steps": 100, "seconds": 12.0, "accuracy": 0.95}]}
    table = recovery.markdown([row])
    # rows before augment existed read as "none"; a step past the run's --steps is "-"
    assert ("| vim_digits | -30.1% | distill | none | 32 | 300 | 0 | 0.0003 | 1.0 | 0.958 | 0.900 / 0.910 (none) | "
            "0.950 / 0.910 (12 s) | not run | - |") in table
    assert len(recovery.merge([row], dict(row, lr=1e-3))) == 2 and len(recovery.merge([row], dict(row))) == 1
    assert len(recovery.merge([row], dict(row, augment="mixup+shift"))) == 2
    assert len(recovery.merge([row], dict(row, augment="none"))) == 1
    assert len(recovery.merge([row], dict(row, seed=1))) == 2


def test_settings_run_with_several_seeds_are_summarised_by_their_mean_and_spread():
    def row(seed, accuracy, lr=3e-4):
        point = {"steps": 300, "seconds": 1.0, "accuracy": accuracy, "agreement": 0.9, "kl": 0.1}
        return {"model": "vim_digits", "ratio": 0.5, "method": "distill", "achieved": 0.498, "lr": lr,
                "temperature": 2.0, "dense": {"accuracy": 0.958}, "training_free": point, "start": {"alignment": "none"},
                "command": "python x", "steps": 300, "batch_size": 128, "augment": "mixup+shift", "seed": seed,
                "points": [point]}

    rows = [row(0, 0.932), row(1, 0.930), row(2, 0.922), row(0, 0.9, lr=1e-3)]   # the last one: a single seed
    summary = recovery.seed_summary(rows)
    assert len([line for line in summary if line.startswith("| vim_digits")]) == 1
    # mean 0.928, 3.0 points below the dense 0.958
    assert ("| vim_digits | -49.8% | distill | mixup+shift | 128 | 300 | 0.0003 | 2.0 | 0, 1, 2 | 0.928 | 0.922 - 0.932 "
            "| 3.0 |") in summary
    assert recovery.seed_summary(rows[:1]) == [] and "Over seeds" in recovery.markdown(rows)
