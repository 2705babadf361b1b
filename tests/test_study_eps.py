"""The eps-schedule study: every cell of the fixed vs scheduled comparison trains with the
schedule its loss option names, and the two sides differ only in their schedule."""
from __future__ import annotations

from collections import Counter

from benchmark.loss_kinds import eps_at_epoch
from benchmark.study import plan

SCHEDULE = {"classic_at": "constant", "classic_at_two_hinge": "two_hinge",
            "trades": "constant", "trades_two_hinge": "two_hinge"}


def test_eps_schedule_study_crosses_fixed_and_scheduled_eps():
    study = plan(["study=eps_schedule"])
    assert study.name == "eps_schedule"
    assert len({c.id for c in study.cells}) == len(study.cells) == 3 * 3 * 4
    by_option = Counter(c.loss for c in study.cells)
    assert by_option == {option: 9 for option in SCHEDULE}
    for cell in study.cells:
        loss = cell.config["loss"]
        assert loss["eps_schedule"]["name"] == SCHEDULE[cell.loss]
        assert loss["kind"] == cell.loss.removesuffix("_two_hinge")
        assert cell.protocol == "fft50" and cell.config["protocol"]["epochs"] == 50


def test_scheduled_cells_differ_from_their_fixed_twin_only_in_the_schedule():
    cells = plan(["study=eps_schedule", "dataset=uc_merced", "model=convnext_tiny.fb_in1k"]).cells
    by_option = {c.loss: c for c in cells}
    for fixed in ("classic_at", "trades"):
        constant, hinged = by_option[fixed].config, by_option[f"{fixed}_two_hinge"].config
        assert {**hinged, "loss": {**hinged["loss"], "eps_schedule": {"name": "constant"}, "name": fixed,
                                   "study_name": constant["loss"]["study_name"]}} == constant
        schedule, target = hinged["loss"]["eps_schedule"], hinged["loss"]["attack"]["eps"]
        assert schedule == {"name": "two_hinge", "t1": 12, "t2": 37}
        epsilons = [eps_at_epoch(schedule, target, epoch, 50, []) for epoch in (0, 11, 12, 24, 37, 49)]
        assert epsilons[:3] == [0.0, 0.0, 0.0] and epsilons[-2:] == [target, target]
        assert 0 < epsilons[3] < target
