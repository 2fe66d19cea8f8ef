"""The device agent: lease a job, time its block, post the result; again until told to stop.

Several agents may serve one device: the service hands each job to one of them. While a
block runs, a heartbeat thread keeps the lease alive; if the agent dies the lease expires and
the job goes back to the queue. When the service is away the agent waits and retries with
backoff. SIGINT or SIGTERM stops it gracefully: the block being timed is abandoned and its
job released, so another agent can take it at once (a second signal stops it immediately).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .backends import Backend
from .client import Backoff, Client, ServiceError, Stopped, Unreachable, retrying
from .signature import BlockSignature


class AgentStopped(Exception):
    """Raised inside the agent (from a signal handler) to abandon the block being timed."""


@dataclass
class AgentReport:
    done: int = 0  # results stored by this agent
    failed: int = 0  # jobs this agent reported as failed
    released: int | None = None  # the job given back on a stop, if any
    stopped: bool = False  # stopped by a signal (or stop()) rather than an empty queue


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Agent:
    def __init__(
        self,
        client: Client,
        device: str,
        make_backend: Callable[[dict], Backend],
        name: str | None = None,
        poll: float = 5.0,
        exit_when_empty: bool = False,
        say: Callable[[str], None] = print,
        backoff: Backoff | None = None,
        give_up_after: float | None = None,
    ):
        self.client, self.device, self.make_backend = client, device, make_backend
        self.name = name or default_name()
        self.poll, self.exit_when_empty, self.say = poll, exit_when_empty, say
        self.backoff, self.give_up_after = backoff or Backoff(), give_up_after
        self.stopping = threading.Event()
        self.interruptible = False  # True while a block is timed: a signal may abandon it
        self.report = AgentReport()
        self._job: dict | None = None  # the job held now

    def stop(self) -> None:
        self.stopping.set()

    def _call(self, method: str, path: str, body=None):
        return retrying(
            lambda: self.client.request(method, path, body),
            self.stopping,
            self.backoff,
            self.say,
            self.give_up_after,
        )

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> AgentReport:
        try:
            info = self._call("GET", f"/devices/{self.device}")
            backend = self.make_backend(info)
            backend.test_connection()
            self.say(
                f"agent {self.name}: device {self.device} ({info['backend']}/"
                f"{info['compute_unit']}/{info['precision']}) at {self.client.url}; "
                f"{_queue(info['jobs'])}"
            )
            waiting = False
            while not self.stopping.is_set():
                reply = self._call(
                    "POST", "/jobs/lease", {"agent": self.name, "device": self.device}
                )
                if reply["job"] is None:
                    if self.exit_when_empty and reply["queue"]["leased"] == 0:
                        self.say(f"agent {self.name}: queue empty; {self._summary()}")
                        break
                    if not waiting:
                        self.say(f"queue empty; asking again every {self.poll:g} s")
                        waiting = True
                    self.stopping.wait(self.poll)
                    continue
                waiting = False
                self._job = reply["job"]
                self._work(backend, reply["job"], reply["lease_seconds"], reply["queue"])
                self._job = None
        except (AgentStopped, Stopped):
            pass
        finally:
            self.interruptible = False
        if self.stopping.is_set():
            self.report.stopped = True
            self._release()
        return self.report

    def _work(self, backend: Backend, job: dict, lease_seconds: float, queue: dict) -> None:
        sig = BlockSignature.from_dict(job["signature"])
        beat = _Heartbeat(self, job, lease_seconds)
        start = time.perf_counter()
        error = None
        try:
            self.interruptible = True
            if self.stopping.is_set():  # the stop came while the lease was on its way
                raise AgentStopped
            timing = backend.profile(sig)
        except AgentStopped:
            raise
        except Exception as e:  # the block failed here: the service retries it or marks it
            error = f"{type(e).__name__}: {e}"
        finally:
            self.interruptible = False
            beat.stop()  # before any post: a late beat would find the lease gone
        if error is not None:
            self._fail(job, error)
            return
        seconds = time.perf_counter() - start
        versions = {k: v if _scalar(v) else str(v) for k, v in timing.versions.items()}
        versions["agent"] = self.name
        body = {"lease_id": job["lease_id"], "samples_ms": timing.samples, "versions": versions}
        try:
            reply = self._call("POST", f"/jobs/{job['id']}/result", body)
        except ServiceError as e:
            if e.status == 409:  # the lease was lost (expired): the job is back in the queue
                self.say(f"job {job['id']}: result not stored: {e.detail}")
                return
            self._fail(job, f"result refused: {e.detail}")  # e.g. a timer too coarse: 0 ms
            return
        self.report.done += reply["stored"]
        note = "" if reply["stored"] else " (already stored by another agent)"
        done = queue["done"] + 1
        total = sum(queue.values())
        self.say(
            f"[{done}/{total}] job {job['id']} {sig.describe()}: {timing.median_ms:.3f} ms "
            f"(median of {len(timing.samples)}, {seconds:.1f} s){note}"
        )

    def _fail(self, job: dict, error: str) -> None:
        self.report.failed += 1
        self.say(f"job {job['id']} failed: {error}")
        try:
            self._call(
                "POST",
                f"/jobs/{job['id']}/fail",
                {"lease_id": job["lease_id"], "error": error[:20_000]},
            )
        except ServiceError as e:  # lease lost meanwhile: its expiry counts the attempt
            self.say(f"could not report the failure of job {job['id']}: {e.detail}")

    def _release(self) -> None:
        """Give the held job back; quickly, since the process is stopping."""
        job, self._job = self._job, None
        if job is None:
            self.say(f"agent {self.name} stopped; {self._summary()}")
            return
        try:
            self.client.request("POST", f"/jobs/{job['id']}/release", {"lease_id": job["lease_id"]})
            self.report.released = job["id"]
            self.say(f"agent {self.name} stopped: released job {job['id']}; {self._summary()}")
        except (ServiceError, Unreachable) as e:
            self.say(
                f"agent {self.name} stopped; could not release job {job['id']} ({e}); "
                "it returns to the queue when its lease expires"
            )

    def _summary(self) -> str:
        return f"{self.report.done} result(s) stored, {self.report.failed} failed"


class _Heartbeat:
    """Renews a lease every third of its length while the block runs."""

    def __init__(self, agent: Agent, job: dict, lease_seconds: float):
        self.agent, self.job = agent, job
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(lease_seconds / 3,), daemon=True, name="heartbeat"
        )
        self._thread.start()

    def _run(self, every: float) -> None:
        path = f"/jobs/{self.job['id']}/heartbeat"
        while not self._stop.wait(every):
            try:
                self.agent.client.request("POST", path, {"lease_id": self.job["lease_id"]})
            except Unreachable:
                continue  # the next beat may get through before the lease ends
            except ServiceError as e:
                self.agent.say(
                    f"lease of job {self.job['id']} lost ({e.detail}); the service will refuse "
                    "its result, and the job is timed again under a new lease"
                )
                return

    def stop(self) -> None:
        self._stop.set()


def _scalar(v) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _queue(counts: dict) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.items())


def install_signal_handlers(agent: Agent) -> None:
    """SIGINT/SIGTERM: stop after releasing the job; a second one: stop now."""

    def handle(signum, frame) -> None:
        if agent.stopping.is_set():
            os._exit(128 + signum)
        agent.say(f"{signal.Signals(signum).name}: stopping (send it again to stop at once)")
        agent.stop()
        if agent.interruptible:
            raise AgentStopped

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
