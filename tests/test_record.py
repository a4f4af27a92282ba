"""The declared trial record (tuner/record.py): every attr a real study run writes is declared
with its type, and the one feasibility rule is what the frames, the terminal and regress use."""

from __future__ import annotations

from optuna.trial import TrialState

from reports.frames import trials_frame
from tests.test_outcomes import fault_runner_registered, fault_space  # noqa: F401 - the fixture
from tuner import record
from tuner.space import validate
from tuner.storage import open_storage
from tuner.study import RunOptions, open_study, run_study


def test_problems_names_undeclared_keys_and_wrong_types():
    assert record.problems({"outcome": "ok", "metrics": {}, "retry_of": None}) == []
    assert record.problems({"outcome": 3, "colour": "red"}) == [
        "outcome: int, declared str", "colour: not declared in tuner.record"]
    assert record.problems({"drift": "high"}, record.STUDY_ATTRS) == ["drift: str, declared float"]


def test_every_attr_a_study_run_writes_is_declared_and_typed(tmp_path, fault_runner_registered):  # noqa: F811
    raw = fault_space(trials=3)
    raw["search"]["baseline"] = True  # a baseline trial, and its drift re-measure at the end
    space = validate(raw, "faults.yaml", "faults")
    journal = str(tmp_path / "j.journal")
    study = open_study(space, open_storage(journal))
    for mode, x in (("crash", 1.0), ("infeasible", 1.0), ("ok", 0.5)):
        study.enqueue_trial({"mode": mode, "x": x})
    summary = run_study(space, open_storage(journal), RunOptions(journal, tmp_path / "out", quiet=True))
    assert summary.counted == 3
    trials = study.get_trials()
    assert len(trials) == 4
    for t in trials:
        assert record.problems(t.user_attrs) == [], t.number
    assert record.problems(study.user_attrs, record.STUDY_ATTRS) == []
    written = {k for t in trials for k in t.user_attrs}
    assert {"outcome", "wall_s", "fail_reason", "stderr_tail", "metrics", "infeasible_reason", "owner",
            "baseline", "config", "artifact_dir"} <= written
    assert {"runner", "constraints", "space", "space_source", "drift", "drift_checks"} <= set(study.user_attrs)
    assert record.STUDY_DRIFT.get(study) == 1.0  # the baseline again: the fault runner's numbers are exact

    # One feasibility rule: the baseline (x=1, kl 0.01 <= 0.05) and the x=0.5 trial are feasible,
    # the infeasible and crashed ones are not; the frames say the same.
    by_mode = {(t.params["mode"], t.params["x"]): t for t in trials}
    feasible = {key for key, t in by_mode.items() if record.feasible(t)}
    assert feasible == {("ok", 1.0), ("ok", 0.5)}
    assert by_mode["crash", 1.0].state == TrialState.FAIL and not record.measured(by_mode["crash", 1.0])
    assert record.measured(by_mode["infeasible", 1.0]) is False  # COMPLETE, but the runner said infeasible
    assert all(record.usable(by_mode[key]) for key in feasible)
    frame = trials_frame(study)
    assert dict(zip(frame["number"], frame["feasible"], strict=True)) == {t.number: record.feasible(t) for t in trials}
