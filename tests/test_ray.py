"""Action evaluation on Ray (nas.search.ray): equal to in-process evaluation, actors that die
are restarted, a two-node cluster on loopback, and every bad input refused within seconds.

The loopback cluster test comes first, while this process is connected to no Ray; then one
local Ray instance (2 CPUs, a small object store) and one pool of two actors serve the rest.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from latency.backends import get_backend  # noqa: E402
from latency.predict import Predictor  # noqa: E402
from latency.profile import build_table  # noqa: E402
from latency.table import LatencyTable  # noqa: E402
from nas.cli import main  # noqa: E402
from nas.cluster import RayCluster, parse_address, probe  # noqa: E402
from nas.experiment import Experiment, RaySpec, load_experiment  # noqa: E402
from nas.search.evolve import RunDir  # noqa: E402
from nas.search.ray import RayEvaluator  # noqa: E402
from nas.search.run import (  # noqa: E402
    experiment_space,
    make_evaluator,
    open_evaluator,
    open_world,
    run_search,
)
from search_spaces import UserError  # noqa: E402

EXPERIMENT = {
    "name": "mini-ray",
    "space": "tiny",
    "world": {"kind": "tiny", "miniature": True},
    "latency": {"device": "cpu-test", "repeats": 1},
    "target": {"ratio": 0.8},
    "search": {"max_iterations": 2, "train_steps": 1, "batch_size": 4, "group_size": 2},
    # 8 prompts: the miniature CLIP scores some of them above zero, so ΔCLIP is not all 0
    "evaluation": {"prompts": 8, "steps": 2, "batch_size": 8},
    "seed": 0,
}
OBJECT_STORE = 200 * 1024**2
TOL = 1e-4  # CLIP points: one thread in the driver and in each actor, same noises


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A cache with the miniature world and a latency table, and the experiment file."""
    root = tmp_path_factory.mktemp("ray")
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFNAS_CACHE", str(root / "cache"))
    data = {**EXPERIMENT, "latency": {**EXPERIMENT["latency"], "db": str(root / "lat.db")}}
    exp_file = root / "mini.yaml"
    exp_file.write_text(yaml.safe_dump(data))
    exp = load_experiment(exp_file)
    space = experiment_space(exp)
    table = LatencyTable(root / "lat.db")
    build_table(space, table, get_backend("torch", repeats=1), "cpu-test", progress=False)
    predictor = Predictor(space, table, "cpu-test")
    world = open_world(exp, space, progress=False)  # built here, so the actors only load it
    yield root, exp_file, exp, space, predictor, world
    table.close()
    mp.undo()


@pytest.fixture(scope="module")
def local(env):
    """The in-process evaluator: what Ray evaluation must equal."""
    _, _, exp, _, _, world = env
    return make_evaluator(exp, world)


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=OBJECT_STORE,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(env, local, local_ray):
    _, _, exp, _, _, _ = env
    cluster = RayCluster.connect(RaySpec(workers=2, max_restarts=1))
    assert not cluster.owned and not cluster.use_gpu  # the test's instance, no GPU here
    evaluator = RayEvaluator(local, partial(open_evaluator, exp), cluster)
    yield evaluator
    evaluator.close()
    cluster.close()


def _same(a, b):
    """Two evaluations' values equal to float tolerance, action by action, in order."""
    assert [v.action for v in a] == [v.action for v in b]
    for x, y in zip(a, b, strict=True):
        assert y.clip == pytest.approx(x.clip, abs=TOL), x.action
        assert y.delta_clip == pytest.approx(x.delta_clip, abs=TOL), x.action
        assert y.delta_ms == pytest.approx(x.delta_ms, rel=1e-9), x.action
        assert y.value == pytest.approx(x.value, abs=TOL / max(x.delta_ms, 1e-9)), x.action


# -- two nodes on loopback (first: before this process starts its local instance) ---------------


RAY = str(Path(sys.executable).with_name("ray"))


def _node_args(ip: str, temp: str, resource: str) -> list[str]:
    """A node of its own: loopback IP, temp dir, ports and a resource naming it."""
    return [
        f"--node-ip-address={ip}",
        "--num-cpus=1",
        f"--temp-dir={temp}",
        f"--resources={json.dumps({resource: 1})}",
        f"--object-store-memory={OBJECT_STORE}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        "--disable-usage-stats",
        "--block",  # stays in the foreground: terminating it stops this node's processes
    ]


def _wait_port(host: str, port: int, proc: subprocess.Popen, log: Path, seconds: float = 90):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ray start exited:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the head did not open {host}:{port}:\n{log.read_text()[-3000:]}")


@pytest.fixture
def loopback_cluster(env):
    """`ray start --head` and a second `ray start --address` on this machine, on loopback
    addresses of their own (127.0.0.2, 127.0.0.3; Ray rewrites 127.0.0.1 to the machine's
    network address), with their own temp dirs; stopped at the end by terminating the two
    `ray start --block` processes (never `ray stop`, which stops every Ray on the machine)."""
    if ray.is_initialized():
        ray.shutdown()  # this test joins a cluster of its own
    temp = Path(tempfile.mkdtemp(prefix="dnr", dir="/tmp"))  # short: Unix socket paths
    port = _free_port()
    # the nodes authenticate as this process does: a local ray.init earlier in the process
    # (another test module's) turns token authentication on here, and a driver and cluster
    # that disagree cannot talk (the cluster drops the driver's actors)
    auth = os.environ.get("RAY_AUTH_MODE", "disabled")
    node_env = {**os.environ, "RAY_AUTH_MODE": auth, "RAY_USAGE_STATS_ENABLED": "0"}
    procs = []

    def start(args: list[str], name: str) -> subprocess.Popen:
        log = temp / f"{name}.log"
        proc = subprocess.Popen(
            [RAY, "start", *args],
            env=node_env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole if need be
        )
        procs.append(proc)
        return proc

    try:
        head = start(
            ["--head", f"--port={port}", "--include-dashboard=false"]
            + _node_args("127.0.0.2", str(temp / "head"), "head_node"),
            "head",
        )
        _wait_port("127.0.0.2", port, head, temp / "head.log")
        worker = start(
            [f"--address=127.0.0.2:{port}"]
            + _node_args("127.0.0.3", str(temp / "worker"), "worker_node"),
            "worker",
        )
        ray.init(address=f"127.0.0.2:{port}", _node_ip_address="127.0.0.2", log_to_driver=False)
        deadline = time.monotonic() + 90
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert worker.poll() is None, (temp / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (temp / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        ray.shutdown()
        yield f"127.0.0.2:{port}", temp
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_search_on_two_loopback_nodes_uses_both(env, loopback_cluster, tmp_path):
    root, exp_file, *_ = env
    address, temp = loopback_cluster
    expected = run_search(load_experiment(exp_file), runs=tmp_path / "in-process", progress=False)
    # one CPU per node: the two actors must go to different nodes
    exp = load_experiment(exp_file, **{"ray.address": address, "ray.workers": 2})
    result = run_search(exp, runs=tmp_path / "cluster", progress=False)
    assert not ray.is_initialized()  # the search disconnected (and left the cluster running)
    a, b = RunDir(expected.run_dir).history(), RunDir(result.run_dir).history()
    nodes = {v["node"] for h in b for v in h["actions"]}
    assert len(nodes) == 2, f"actions ran on {nodes}; logs in {temp}"
    assert [h["applied"] for h in a] == [h["applied"] for h in b]
    for x, y in zip(a, b, strict=True):
        assert y["clip"] == pytest.approx(x["clip"], abs=TOL)
        assert [v["delta_clip"] for v in y["actions"]] == pytest.approx(
            [v["delta_clip"] for v in x["actions"]], abs=TOL
        )
    assert result.arch == expected.arch
    # the cluster is still up after the search left it
    socket.create_connection(tuple(parse_address(address)), timeout=2).close()


def test_the_search_starts_and_stops_its_local_instance():
    """No address: a local instance sized to the machine, stopped by close() — and when the
    cluster cannot hold the workers, stopped before the error."""
    assert not ray.is_initialized()
    cluster = RayCluster.connect(RaySpec(workers=2, num_cpus=2))
    try:
        assert cluster.owned and ray.is_initialized()
        assert ray.cluster_resources()["CPU"] == 2
    finally:
        cluster.close()
    assert not ray.is_initialized()
    with pytest.raises(UserError, match="64 workers need one CPU each, but the Ray instance has 2"):
        RayCluster.connect(RaySpec(workers=64, num_cpus=2))
    assert not ray.is_initialized()


# -- equality with in-process evaluation ------------------------------------------------------


def test_ray_evaluation_equals_in_process(env, local, pool):
    _, _, _, space, predictor, _ = env
    arch = space.original()
    expected = local.evaluate(arch, predictor, ("remove",), local.clip_score(arch))
    assert any(v.delta_clip != 0 for v in expected)  # the comparison means something
    assert all(v.node is None for v in expected)
    seen = []
    got = pool.evaluate(arch, predictor, ("remove",), None, lambda: seen.append(1))
    _same(expected, got)
    assert len(seen) == len(got)  # progress once per action
    assert pool.clip_score(arch) == pytest.approx(local.clip_score(arch), abs=TOL)
    workers = pool.nodes()
    assert len({w["pid"] for w in workers}) == 2 and all(w["threads"] == 1 for w in workers)
    # CPU actors keep their heap as the driver does (no page fault per fresh activation)
    glibc = platform.libc_ver()[0] == "glibc"
    assert all(w["heap_kept"] == glibc for w in workers)
    assert {v.node for v in got} == {w["node"] for w in workers}
    assert all(p.attempts == 1 for p in pool.placements)


def test_new_weights_and_copies_reach_the_actors(env, local, pool):
    """Weights changed in place (as training does) are shipped once, and copy actions create
    the same copies on the actors as in process."""
    _, _, _, space, predictor, _ = env
    arch = space.original().apply(next(a for a in space.actions(space.original())))
    supernet = local.supernet
    saved = {k: v.clone() for k, v in supernet.state_dict().items()}
    try:
        with torch.no_grad():
            for p in supernet.parameters():
                p.mul_(1.05)
        base = local.clip_score(arch)
        expected = local.evaluate(arch, predictor, ("remove", "copy"), base)
        version = pool._version
        got = pool.evaluate(arch, predictor, ("remove", "copy"), pool.clip_score(arch))
        assert pool._version == version + 1  # the new weights went out once, not per call
        assert any(v.kind == "copy" for v in got)
        _same(expected, got)
    finally:
        supernet.load_state_dict(saved, strict=False)  # copies made meanwhile stay


# -- fault tolerance ----------------------------------------------------------------------------


def _kill_one_busy_actor(pool: RayEvaluator, killed: list):
    """A progress callback that SIGKILLs the process of actor 0 once, while it scores an
    action (the pool hands an actor its next action before reporting progress)."""
    pids = {i: w["pid"] for i, w in enumerate(pool.nodes())}

    def progress():
        if killed:
            return
        victim = 0
        os.kill(pids[victim], signal.SIGKILL)
        killed.append((victim, pids[victim]))

    return progress


def test_an_actor_killed_mid_evaluation_is_restarted_and_its_action_rerun(env, local, pool):
    _, _, _, space, predictor, _ = env
    arch = space.original()
    expected = local.evaluate(arch, predictor, ("remove",), local.clip_score(arch))
    killed: list = []
    got = pool.evaluate(arch, predictor, ("remove",), None, _kill_one_busy_actor(pool, killed))
    assert killed, "no actor was killed"
    _same(expected, got)
    victim, old_pid = killed[0]
    assert not pool.dead  # restarted, not gone
    assert pool.nodes()[victim]["pid"] != old_pid  # a new process took its place


def test_an_actor_past_its_restarts_hands_its_action_to_another(env, local, pool):
    """max_restarts=1, used up by the previous test: killing the same actor again is for
    good, and the action it was scoring goes to the other actor."""
    _, _, _, space, predictor, _ = env
    arch = space.original()
    expected = local.evaluate(arch, predictor, ("remove",), local.clip_score(arch))
    killed: list = []
    got = pool.evaluate(arch, predictor, ("remove",), None, _kill_one_busy_actor(pool, killed))
    _same(expected, got)
    assert pool.dead == {killed[0][0]}
    assert sorted(p.attempts for p in pool.placements)[-1] == 2  # sent again, elsewhere


# -- bad input ----------------------------------------------------------------------------------


def test_unreachable_address_is_refused_within_seconds(env):
    port = _free_port()  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(UserError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}"):
        RayCluster.connect(RaySpec(address=f"127.0.0.1:{port}"))
    assert time.perf_counter() - start < 10
    with pytest.raises(UserError, match="give the head node's HOST:PORT"):
        parse_address("head-without-port")
    with pytest.raises(UserError, match="HOST:PORT"):
        probe("127.0.0.1:99999")


def test_cli_refuses_bad_ray_flags(env, capsys):
    root, exp_file, *_ = env
    runs = root / "bad-runs"
    with pytest.raises(SystemExit) as e:
        main(["search", str(exp_file), "--runs", str(runs), "--workers", "0"])
    assert e.value.code == 2
    assert "--workers 0: give at least 1" in capsys.readouterr().err
    port = _free_port()
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(["search", str(exp_file), "--runs", str(runs), "--ray-address", f"127.0.0.1:{port}"])
    assert e.value.code == 2 and time.perf_counter() - start < 10
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in capsys.readouterr().err
    assert not runs.exists()  # refused before anything was written
    with pytest.raises(UserError, match="ray.workers: Input should be greater than or equal to 1"):
        load_experiment(exp_file, **{"ray.workers": 0})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpus_requested_where_none_exist(local_ray):
    with pytest.raises(UserError, match="GPUs were requested .* none"):
        RayCluster.connect(RaySpec(workers=1, gpus=True))


def test_more_workers_than_cpus_is_refused(local_ray):
    with pytest.raises(UserError, match="5 workers need one CPU each, but the Ray instance has 2"):
        RayCluster.connect(RaySpec(workers=5))


def test_ray_settings_are_not_part_of_the_experiment(env):
    _, exp_file, exp, *_ = env
    other = load_experiment(exp_file, **{"ray.workers": 4, "ray.address": "head:6379"})
    assert other.content_hash() == exp.content_hash()  # a run resumes with other workers
    assert not Experiment.model_validate(EXPERIMENT).ray.enabled
    assert RaySpec(workers=2).enabled and RaySpec(address="head:6379").enabled
