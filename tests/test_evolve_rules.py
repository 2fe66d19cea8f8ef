"""How the evolution picks its removals (nas.search.evolve._remove) on a synthetic latency table."""

import pytest
from test_latency import DEVICE, measurement

from latency.predict import Predictor
from latency.signature import signatures
from latency.table import LatencyTable
from nas.search.evaluate import ActionValue
from nas.search.evolve import _remove
from search_spaces import Action, load_space


@pytest.fixture(scope="module")
def space():
    return load_space("tiny")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, space):
    with LatencyTable(tmp_path_factory.mktemp("rules") / "t.db") as table:
        table.add([measurement(s, float(3 * i + 1)) for i, s in enumerate(signatures(space))])
        yield Predictor(space, table, DEVICE)


def removal(slot: str, clip: float, value: float) -> ActionValue:
    """A removal scored at `clip` after it, with `value` (the rules read nothing else)."""
    return ActionValue(f"remove {slot}", "remove", slot, clip, 50 - clip, 1.0, value, 0.0)


def savings(space, predictor, arch) -> dict[str, float]:
    """Predicted ms each legal removal saves."""
    total = predictor.predict(arch).total_ms
    return {
        a.slot: total - predictor.predict(arch.apply(a)).total_ms
        for a in space.actions(arch)
        if a.kind == "remove"
    }


def test_lowest_value_while_no_removal_meets_the_target(space, predictor):
    arch = space.original()
    slots = sorted(savings(space, predictor, arch))
    values = [removal(s, 40.0 + i, float(i)) for i, s in enumerate(slots)]
    chosen, rules = _remove(space, arch, values, 2, predictor, target_ms=1.0)  # out of reach
    assert chosen == [Action("remove", slots[0]), Action("remove", slots[1])]
    assert rules == ["lowest value", "lowest value"]


def test_least_loss_among_the_removals_that_meet_the_target(space, predictor):
    arch = space.original()
    saving = savings(space, predictor, arch)
    cut = sorted(saving.values())[-3]  # a target that only the three costliest removals meet
    target = predictor.predict(arch).total_ms - cut
    landing = sorted(s for s, d in saving.items() if d >= cut)
    assert 1 <= len(landing) < len(saving)
    # the lowest value is a landing removal that loses much; another landing one loses least
    values = [removal(s, 45.0, 10.0) for s in saving]
    by_slot = {v.slot: v for v in values}
    by_slot[landing[0]].clip, by_slot[landing[0]].value = 30.0, -5.0
    by_slot[landing[1]].clip = 49.0
    chosen, rules = _remove(space, arch, values, 2, predictor, target)
    assert chosen == [Action("remove", landing[1])]  # and then the group stops: target met
    assert rules == ["meets the target, least CLIP loss"]
    assert predictor.predict(arch.apply(chosen[0])).total_ms <= target


def test_a_removal_that_meets_the_target_but_loses_more_is_not_taken(space, predictor):
    # only costly blocks meet the target, and they lose far more than the lowest-value one:
    # cheap removals over more iterations cost less CLIP than one costly block
    arch = space.original()
    saving = savings(space, predictor, arch)
    cut = sorted(saving.values())[-3]
    target = predictor.predict(arch).total_ms - cut
    landing = {s for s, d in saving.items() if d >= cut}
    values = [removal(s, 20.0 if s in landing else 45.0, 10.0) for s in saving]
    cheap = next(v for v in values if v.slot not in landing)
    cheap.value = -1.0
    chosen, rules = _remove(space, arch, values, 1, predictor, target)
    assert chosen == [Action("remove", cheap.slot)] and rules == ["lowest value"]
    assert predictor.predict(arch.apply(chosen[0])).total_ms > target  # the next iteration goes on
