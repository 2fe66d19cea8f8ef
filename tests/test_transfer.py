"""Few-shot transfer: B's table from A's and K measurements on B."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest
from scipy import stats
from test_service_support import cache_unet_parts, cli, tiny_blocks, tiny_count

from latency.backends import Timing
from latency.jobs import JobStore
from latency.measurement import SOURCES
from latency.predict import Predictor
from latency.table import LatencyTable, Measurement
from latency.transfer import Candidate, block_cost, choose, transfer
from search_spaces import UserError, load_space

TORCH_CPU = {"backend": "torch", "compute_unit": "cpu", "precision": "fp32"}
# device B's fixed cost per block kind (launches, layout changes): not a function of A's time
LAUNCH_MS = {"cross_attention": 0.12, "resnet": 0.05, "concat": 0.01}


@pytest.fixture(autouse=True)
def _parts(monkeypatch):
    cache_unet_parts(monkeypatch)


def a_ms(sig) -> float:
    """Device A: a latency that grows with the block's work, plus a fixed overhead."""
    flops, moved = block_cost(sig)
    return 0.002 + flops / 1e8 + moved / 1e9


def b_ms(sig) -> float:
    """Device B, of another kind than A and outside the transfer model's family (log(B/A)
    linear in size features and kind offsets): a roofline — compute-bound or memory-bound,
    whichever is slower, at another balance than A's sum — plus a fixed cost per kind, and
    a little noise. Ranking B's blocks by A's latencies is then wrong for many pairs."""
    flops, moved = block_cost(sig)
    noise = random.Random(sig.hash).uniform(0.97, 1.03)
    roof = max(flops / 3e8, moved / 2e8)
    return (LAUNCH_MS.get(sig.kind, 0.03) + roof) * noise


@pytest.fixture
def table(tmp_path):
    t = LatencyTable(tmp_path / "t.db")
    t.add(
        Measurement("cpu-a", "torch", "cpu", "fp32", s, [a_ms(s)], a_ms(s), 0.0)
        for s in tiny_blocks()
    )
    yield t
    t.close()


def test_transfer_measures_k_and_predicts_the_rest(table):
    measured = []

    def measure(sig):
        measured.append(sig)
        return Timing([b_ms(sig)] * 3, {"fake": True})

    report = transfer(table, "cpu-a", "cpu-b", 10, TORCH_CPU, measure)
    rest = tiny_count() - 10
    assert len(measured) == 10 and len(report.predicted) == rest
    assert {s.kind for s in measured} >= {"resnet", "cross_attention", "concat"}  # spread
    rows = table.rows("cpu-b")
    by_source = {src: {m.signature.hash for m in rows if m.source == src} for src in SOURCES}
    assert by_source["measured"] == {s.hash for s in measured}
    assert len(by_source["predicted"]) == rest
    assert not by_source["predicted"] & by_source["measured"]

    truth = {s.hash: b_ms(s) for s in tiny_blocks()}
    hashes = sorted(report.predicted)
    pred = [report.predicted[h] for h in hashes]
    true = [truth[h] for h in hashes]
    tau = stats.kendalltau(pred, true).statistic
    rest = [s for s in tiny_blocks() if s.hash in report.predicted]
    a_of = {s.hash: a_ms(s) for s in tiny_blocks()}
    naive = stats.kendalltau([a_ms(s) for s in rest], [b_ms(s) for s in rest]).statistic
    assert tau > naive  # better than ranking B's blocks by A's latencies
    # and far better than A scaled by the anchors' median ratio (B is not A times a constant)
    mape = np.mean(np.abs(np.array(pred) / np.array(true) - 1))
    ratio = statistics.median(truth[h] / a_of[h] for h in report.anchors)
    scaled = np.mean([abs(a_ms(s) * ratio / b_ms(s) - 1) for s in rest])
    assert mape < 0.2 and mape < scaled / 2, (mape, scaled)
    assert math.isfinite(report.loo_mape) and report.loo_mape < 30

    # the table now predicts B's networks; measured rows are never shadowed by predicted ones
    space = load_space("tiny")
    Predictor(space, table, "cpu-b").predict(space.original())
    found = table.lookup("cpu-b", tiny_blocks())
    assert {h for h, m in found.items() if m.source == "measured"} == by_source["measured"]

    # a rerun measures nothing new (B's measurements count toward the budget)
    again = transfer(table, "cpu-a", "cpu-b", 10, TORCH_CPU, measure)
    assert len(measured) == 10 and again.measured == [] and len(again.anchors) == 10


def test_choose_spreads_over_kinds_and_sizes():
    cands = [Candidate(s, a_ms(s)) for s in tiny_blocks()]
    picks = choose(cands, 8)
    assert len(set(picks)) == 8
    kinds = {cands[i].signature.kind for i in picks}
    assert len(kinds) >= 6  # 8 kinds in tiny: nearly all of them covered
    # anchors already measured are not picked again, and the picks stay away from them
    more = choose(cands, 5, [cands[i].signature for i in picks])
    assert not set(more) & set(picks) and len(more) == 5


def test_transfer_errors(table):
    with pytest.raises(UserError, match="same device"):
        transfer(table, "cpu-a", "cpu-a", 10, TORCH_CPU, None)
    with pytest.raises(UserError, match="at least 2"):
        transfer(table, "cpu-a", "cpu-b", 1, TORCH_CPU, None)
    with pytest.raises(UserError, match=f"only {tiny_count()} measured"):
        transfer(table, "cpu-a", "cpu-b", 40, TORCH_CPU, None)
    with pytest.raises(UserError, match="no measurements for device 'nope'"):
        transfer(table, "nope", "cpu-b", 10, TORCH_CPU, None)
    assert table.rows("cpu-b") == []


def test_transfer_command_queues_for_agents(table, tmp_path, capsys):
    db = tmp_path / "t.db"
    with JobStore(db) as store:
        store.add_device("cpu-c", "other-cpu", "torch")
    argv = ["latency", "transfer", "--from", "cpu-a", "--to", "cpu-c", "--budget", 6]
    code, text = cli(*argv, "--queue", "--db", db, capsys=capsys)
    assert code == 0 and "queued 6 block(s) for cpu-c" in text
    with JobStore(db) as store:
        jobs = store.jobs("cpu-c")
        assert len(jobs) == 6 and {j.state for j in jobs} == {"queued"}
        # agents measure them (here: by hand), then the same command fills the rest
        for j in jobs:
            table.add(Measurement("cpu-c", "torch", "cpu", "fp32", j.signature, [2.0], 2.0, 0.0))
    code, text = cli(*argv, "--queue", "--db", db, capsys=capsys)
    filled = f"6 block(s) measured (0 now), {tiny_count() - 6} filled as `predicted`"
    assert code == 0 and filled in text
    argv = ["latency", "transfer", "--from", "cpu-a", "--to", "phone", "--backend", "coreml"]
    code, text = cli(*argv, "--db", db, capsys=capsys)
    assert code == 2 and "Core ML timing needs macOS" in text and "--queue" in text


def test_transfer_onto_another_input_size(table):
    # B runs every block at twice A's batch: the target signature maps each A block to its
    # batch-4 twin, which is what B measures and what its table holds
    twin = dict(zip((s.hash for s in tiny_blocks(2)), tiny_blocks(4), strict=True))
    measured = []

    def measure(sig):
        measured.append(sig.hash)
        return Timing([b_ms(sig)], {})

    report = transfer(
        table, "cpu-a", "cpu-b", 8, TORCH_CPU, measure, target_signature=lambda s: twin[s.hash]
    )
    b_hashes = {s.hash for s in tiny_blocks(4)}
    assert set(measured) <= b_hashes and set(report.predicted) <= b_hashes
    assert len(measured) + len(report.predicted) == len(twin)
    assert {m.signature.hash for m in table.rows("cpu-b")} == b_hashes
