"""The three how-tos of the documentation (docs/howtos.md), run command by command, in their
order, at miniature sizes.

Every command a test runs is first looked up in docs/howtos.md, so the page cannot drift
from what is tested. `diffnas` commands run in this process (as
`diffnas ARGV` would, through `nas.cli.main`), with miniature flags appended (one timed
run per block, one thread); the server and the agent run as processes of their own; the
page's `curl` lines run in bash as written. `~/.cache/diffnas` stands for the test's
`DIFFNAS_CACHE`, and the experiment files are copies of `experiments/tiny.yaml` edited as
the page says, plus a miniature world and a short search.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_service_support import Child, ServeChild, cache_unet_parts, cli, free_port, tiny_count

from latency.table import LatencyTable
from nas.search.evolve import RunDir
from search_spaces import Architecture

REPO = Path(__file__).resolve().parents[1]
HOWTOS = (REPO / "docs" / "howtos.md").read_text()
FAST = ["--repeats", "1", "--warmup", "0", "--threads", "1"]  # one timed run per block


def flat(text: str) -> str:
    return " ".join(text.replace("\\\n", " ").split())


def documented(command: str) -> str:
    assert flat(command) in flat(HOWTOS), f"not in docs/howtos.md: {command}"
    return command


def block(first_line: str) -> str:
    """The code block of docs/howtos.md that starts with `first_line`."""
    for body in re.findall(r"```\w*\n(.*?)```", HOWTOS, re.S):
        text = "\n".join(line.removeprefix("   ") for line in body.splitlines()) + "\n"
        if text.startswith(first_line):
            return text
    raise AssertionError(f"no code block starting with {first_line!r} in the how-tos")


def diffnas(command: str, *extra: str, capsys) -> tuple[int, str]:
    """A command line of the how-tos, in this process: (exit code, output with lines re-joined)."""
    command = documented(command).replace("~/.cache/diffnas", os.environ["DIFFNAS_CACHE"])
    argv = shlex.split(command)
    assert argv[0] == "diffnas"
    return cli(*argv[1:], *extra, capsys=capsys)


def shell(command: str, **env: str) -> str:
    """A shell line of the how-tos (curl, ...) in bash, with this environment's python first."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(
        ["bash", "-c", documented(command)],
        env={**os.environ, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def tiny_experiment(path: Path, **keys) -> dict:
    """`cp experiments/tiny.yaml PATH`, the how-to's edits, and miniature sizes."""
    shutil.copy(REPO / "experiments" / "tiny.yaml", path)
    exp = yaml.safe_load(path.read_text())
    for key, value in keys.items():
        exp[key] = value
    exp["world"]["miniature"] = True  # a world built in seconds
    exp["latency"]["repeats"] = 1
    exp["search"].update(max_iterations=8, train_steps=1, batch_size=4, group_size=4)
    # racing scores a first round on 8 images: more than these 2, so every action on each
    exp["evaluation"].update(prompts=2, steps=2, batch_size=4, racing=0)
    path.write_text(yaml.safe_dump(exp))
    return exp


def found(text: str) -> tuple[str, float, float]:
    """(architecture hash, latency, target) of `diffnas search`'s last lines."""
    m = re.search(r"found ([0-9a-f]+): ([\d.]+) ms \(target ([\d.]+)\)", text)
    assert m, text
    return m[1], float(m[2]), float(m[3])


def predicted(text: str) -> float:
    m = re.search(r"predicted: ([\d.]+) ms", text)
    assert m, text
    return float(m[1])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One DIFFNAS_CACHE for the module: the miniature world's CLIP is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def workdir(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFNAS_CACHE", str(cache))
    for name in ("DIFFNAS_LATENCY_DB", "DIFFNAS_TOKEN", "DIFFNAS_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_howto_search_for_a_new_latency_target(workdir, capsys, monkeypatch):
    # 1. copy the tiny experiment, set its name
    tiny_experiment(workdir / "fast.yaml", name="fast")
    # 0.5, not nearer the smallest reachable ratio (0.38-0.42 here, with the machine's noise)
    search = "diffnas search fast.yaml --target-ratio 0.5"

    # 2. the search, stopped by Ctrl-C after its first iteration
    real = RunDir.save_iteration

    def interrupted(self, record, model):
        real(self, record, model)
        if record["iteration"] == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save_iteration", interrupted)
    code, text = diffnas(search, capsys=capsys)
    assert code != 0 and "iteration 0:" in text
    monkeypatch.setattr(RunDir, "save_iteration", real)
    run = workdir / "runs" / "fast"
    assert len(RunDir(run).history()) == 1 and not (run / "report.html").exists()

    # 4. resumed with the same command: it goes on from iteration 1 to the end
    code, text = diffnas(f"{search} --resume runs/fast", capsys=capsys)
    assert code == 0, text
    arch_hash, latency, target = found(text)
    assert latency <= target
    assert "iteration 0:" not in text and "iteration 1:" in text
    history = RunDir(run).history()
    assert [h["iteration"] for h in history] == list(range(len(history)))
    assert history[0]["target_ms"] == pytest.approx(0.5 * history[0]["latency_ms"], rel=1e-3)
    # on a finished run it prints the result again
    code, again = diffnas(f"{search} --resume runs/fast", capsys=capsys)
    assert code == 0 and found(again) == (arch_hash, latency, target)
    assert len(RunDir(run).history()) == len(history)

    # 3. the report
    assert "report: runs/fast/report.html" in text
    html = (run / "report.html").read_text()
    for picture in ("progress.png", "values.png", "architecture.png", "comparison.png"):
        assert picture in html and (run / picture).is_file()
    # the summary's CLIP uses the last weights, the iterations' their own: the page says so
    assert "CLIP score (final weights)" in html and "which trained them for 1 step before" in html

    # 5. the found network, checked against the space and the table
    arch = Architecture.load(run / "final.arch.json")
    assert arch.space == "tiny" and arch.hash == arch_hash and 0 in arch.multiplicity.values()
    code, text = diffnas("diffnas space show tiny --arch runs/fast/final.arch.json", capsys=capsys)
    assert code == 0 and "parameters, final:" in text and "of origin" in text
    code, text = diffnas(
        "diffnas latency predict tiny runs/fast/final.arch.json --device cpu-local "
        "--db ~/.cache/diffnas/latency.db",
        capsys=capsys,
    )
    assert code == 0, text
    assert predicted(text) == pytest.approx(latency, abs=0.01) and predicted(text) <= target
    assert any((run / "final").iterdir())


CURL_DEVICE = """curl -s -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \\
     -d '{"name": "xeon-2c", "kind": "xeon-2core", "backend": "torch"}' $S/devices"""
CURL_JOBS = """curl -s -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \\
     -d '{"space": "tiny"}' $S/devices/xeon-2c/jobs"""
CURL_TOKEN = """(umask 077; curl -s -H "Authorization: Bearer $ADMIN" \\
     -H 'Content-Type: application/json' \\
     -d '{"role": "agent", "device": "xeon-2c"}' $S/tokens \\
     | python -c 'import json,sys; print(json.load(sys.stdin)["token"])' > agent.token)"""
CURL_STATUS = 'curl -s -H "Authorization: Bearer $ADMIN" $S/devices/xeon-2c'
CURL_PHONE = (
    """curl -s -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \\\n"""
    """     -d '{"name": "phone", "kind": "iphone-14-pro", "backend": "coreml", """
    """"compute_unit": "CPU_AND_NE", "precision": "fp16"}' $S/devices"""
)
TRANSFER = (
    "diffnas latency transfer --from xeon-2c --to phone --budget 6 --space tiny --queue "
    "--db team.db"
)


def test_howto_profile_a_new_device(workdir, capsys, monkeypatch):
    cache_unet_parts(monkeypatch)  # the tiny UNet's blocks are read once per process
    n = tiny_count()

    # 1. the service; its first start writes the admin token file
    documented("diffnas latency serve --db team.db &")
    server = ServeChild(Path("team.db"), free_port(), workdir / "serve.log", admin_env=False)
    try:
        assert (workdir / "team.db.admin-token").stat().st_mode & 0o077 == 0
        env = {"ADMIN": server.admin, "S": server.url}
        documented("ADMIN=$(cat team.db.admin-token); S=http://127.0.0.1:8470")

        # 2. the device, its jobs, its agent token
        assert json.loads(shell(CURL_DEVICE, **env))["name"] == "xeon-2c"
        jobs = json.loads(shell(CURL_JOBS, **env))
        assert len(jobs["created"]) == n == 24
        shell(CURL_TOKEN, **env)
        token = workdir / "agent.token"
        assert token.read_text().startswith("dnl_") and token.stat().st_mode & 0o077 == 0

        # 3. the agent next to the device times every block, then stops
        agent = documented(
            "diffnas latency agent --server $S --device xeon-2c --token-file agent.token "
            "--exit-when-empty"
        )
        argv = shlex.split(agent.replace("$S", server.url))[1:] + [*FAST, "--poll", "0.05"]
        child = Child(argv, workdir / "agent.log")
        assert child.exitcode(timeout=120) == 0, child.output()
        assert f"[{n}/{n}] job" in child.output()
        status = json.loads(shell(CURL_STATUS, **env))
        assert status["jobs"] == {"queued": 0, "leased": 0, "done": n, "failed": 0}

        # 4. the table the agent filled
        code, text = diffnas("diffnas latency show --device xeon-2c --db team.db", capsys=capsys)
        assert code == 0 and "median ms" in text
        with LatencyTable(workdir / "team.db") as table:
            rows = table.rows("xeon-2c")
        assert len(rows) == n and {m.source for m in rows} == {"measured"}
        assert max(rows, key=lambda m: m.median_ms).signature.hash in text  # slowest first
        code, text = diffnas(
            "diffnas latency predict tiny --device xeon-2c --db team.db", capsys=capsys
        )
        assert code == 0 and predicted(text) > 0

        # 5. a phone, and the few blocks the transfer picks for it
        assert json.loads(shell(CURL_PHONE, **env))["backend"] == "coreml"
        code, text = diffnas(TRANSFER, capsys=capsys)
        assert code == 0 and "queued 6 block(s) for phone" in text, text

        # 6. the bundle of those blocks
        code, text = diffnas(
            "diffnas latency bundle --device phone --db team.db bundle/", capsys=capsys
        )
        assert code == 0, text
        manifest = json.loads((workdir / "bundle" / "manifest.json").read_text())
        assert manifest["device"] == "phone" and len(manifest["models"]) == 6
        for model in manifest["models"]:
            assert (workdir / "bundle" / model["path"]).is_dir()

        # 7. what the phone's app writes: the manifest's runs of every model
        xeon = {m.signature.with_dtype("fp16").hash: m.median_ms for m in rows}
        runs = manifest["timing"]["repeats"]
        results = {
            "format": "diffnas-results",
            "version": 1,
            "bundle_id": manifest["bundle_id"],
            "device": "phone",
            "results": [
                {"sig_hash": m["sig_hash"], "samples_ms": [3 * xeon[m["sig_hash"]]] * runs}
                for m in manifest["models"]
            ],
        }
        (workdir / "results.json").write_text(json.dumps(results))

        # 8. back into the table
        imported = "diffnas latency import --device phone results.json --db team.db"
        code, text = diffnas(imported, capsys=capsys)
        assert code == 0 and "imported 6 result(s) for phone" in text, text
        code, text = diffnas(imported, capsys=capsys)
        assert code == 0 and "imported 0 result(s)" in text and "6 already stored" in text
        with LatencyTable(workdir / "team.db") as table:
            phone = table.rows("phone")
        assert len(phone) == 6 and {m.source for m in phone} == {"measured"}
        status = server.call("GET", "/devices/phone")[1]
        assert status["jobs"]["done"] == 6 and status["jobs"]["queued"] == 0

        # 9. the rest of the phone's table, predicted from xeon-2c
        code, text = diffnas(TRANSFER, capsys=capsys)
        assert code == 0 and f"{n - 6} filled as `predicted` from xeon-2c" in text, text
        with LatencyTable(workdir / "team.db") as table:
            phone = table.rows("phone")
        sources = [m.source for m in phone]
        assert sources.count("measured") == 6 and sources.count("predicted") == n - 6
        code, text = diffnas(
            "diffnas latency predict tiny --device phone --db team.db", capsys=capsys
        )
        assert code == 0 and predicted(text) > 0
    finally:
        server.kill()


def test_howto_plug_in_your_own_search_space(workdir, capsys, monkeypatch):
    # 1. the space file, as the how-to gives it
    space_yaml = block("# my-space.yaml")
    (workdir / "my-space.yaml").write_text(space_yaml)

    # 2. checked and shown
    code, text = diffnas("diffnas space validate my-space.yaml", capsys=capsys)
    assert (
        code == 0 and "ok space 'my-space': 18 slots in 7 stages, 9 removable, 7 copyable" in text
    )
    code, text = diffnas("diffnas space show my-space.yaml --slots", capsys=capsys)
    assert code == 0 and "slots" in text and "parameters, origin: 1,538,700" in text

    # 3. a plug-in package, installed (here into a folder put on sys.path rather than with
    # `pip install -e`, which would change the test environment itself)
    package = workdir / "my-spaces" / "src" / "my_spaces"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(block("# my-spaces/src/my_spaces/__init__.py"))
    (package / "my-space.yaml").write_text(space_yaml)
    (workdir / "my-spaces" / "pyproject.toml").write_text(block("# my-spaces/pyproject.toml"))
    documented("pip install -e ./my-spaces")
    pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps"]
    done = subprocess.run(
        [*pip, "--no-index", "--target", "site", "./my-spaces"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    monkeypatch.syspath_prepend(str(workdir / "site"))
    try:
        (workdir / "my-space.yaml").unlink()  # from here on, the space comes from the package
        code, text = diffnas("diffnas space list", capsys=capsys)
        assert code == 0 and "my-space │ plug-in (my-spaces)" in text, text

        # 4. its blocks measured into ./latency.db
        code, text = diffnas(
            "diffnas latency build my-space --device cpu-local", *FAST, capsys=capsys
        )
        assert code == 0 and f"measured {tiny_count()} block(s)" in text, text
        assert (workdir / "latency.db").is_file()

        # 5. an experiment over it, searched in the tiny world
        latency = {"device": "cpu-local", "db": "latency.db", "repeats": 1}
        tiny_experiment(
            workdir / "my-search.yaml", name="my-search", space="my-space", target={"ratio": 0.7}
        )
        exp = yaml.safe_load((workdir / "my-search.yaml").read_text())
        exp["latency"].update(latency)
        (workdir / "my-search.yaml").write_text(yaml.safe_dump(exp))
        code, text = diffnas("diffnas search my-search.yaml", capsys=capsys)
        assert code == 0, text
        arch_hash, latency_ms, target = found(text)
        assert latency_ms <= target
        run = workdir / "runs" / "my-search"
        arch = Architecture.load(run / "final.arch.json")
        assert arch.space == "my-space" and arch.hash == arch_hash
        assert (run / "report.html").is_file()
        # only what my-space allows was done: every ResNet outside the mid block is kept
        for slot, k in arch.multiplicity.items():
            if ".resnets." in slot and not slot.startswith("mid_block."):
                assert k == 1, slot
        assert yaml.safe_load((run / "experiment.yaml").read_text())["space"] == "my-space"
    finally:
        sys.modules.pop("my_spaces", None)
