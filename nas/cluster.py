"""The Ray cluster a search or a training runs on: the address a user gives (`--ray-address`),
checked within seconds, and a local cluster started and stopped when none is given
(docs/distributed.md). Both the search's evaluator pool (`nas.search.ray`) and Ray Train
(`nas.training.ray`) stand on it.
"""

from __future__ import annotations

import logging
import os
import socket

import torch

from nas.experiment import RaySpec
from search_spaces import UserError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0  # a cluster address that accepts no connection in this long is refused
ENV_FORWARDED = ("DIFFNAS_CACHE",)  # driver environment an actor needs to find the world


# -- the cluster ---------------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """host and port of a Ray address: HOST:PORT, or ray://HOST:PORT (Ray Client)."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"--ray-address {address!r}: give the head node's HOST:PORT (e.g. head:6379, the "
            "port `ray start --head` printed), or ray://HOST:PORT for Ray Client"
        )
    return host, int(port)


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse an address that nothing listens on, within `timeout` seconds (ray.init itself
    would retry for minutes)."""
    host, port = parse_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(
            f"cannot reach a Ray cluster at {address} ({reason} after at most {timeout:g} s); "
            "start one with `ray start --head --port PORT` on the head node, check the "
            "address and firewall, or leave out --ray-address to use a local Ray instance"
        ) from None


def _is_loopback(host: str) -> bool:
    try:
        return socket.inet_aton(host)[0] == 127
    except OSError:
        return False


class RayCluster:
    """A connection to Ray for the search: a local instance it starts (and stops at `close`)
    or an existing cluster it joins (and only leaves at `close`)."""

    def __init__(self, spec: RaySpec):
        self.spec = spec
        self.owned = False  # True: this started the Ray instance and shuts it down
        self.joined = False  # True: this connected the driver (and disconnects it)
        self.use_gpu = False

    @classmethod
    def connect(cls, spec: RaySpec) -> RayCluster:
        """Connect (probing a given address first), then check the cluster can hold
        `spec.workers` actors. Every refusal is a UserError within seconds."""
        import ray

        cluster = cls(spec)
        if spec.address is not None:
            probe(spec.address)
        if spec.gpus and spec.address is None and not torch.cuda.is_available():
            raise UserError(
                "GPUs were requested (--gpus / ray.gpus: true) but this machine has none "
                "that torch can use; leave out --gpus to evaluate on CPUs, or give the "
                "--ray-address of a cluster with GPUs"
            )
        if ray.is_initialized():  # the caller's Ray (a test, a notebook): use it as it is
            log.info("using the Ray instance this process is already connected to")
        elif spec.address is not None:
            host, _ = parse_address(spec.address)
            kwargs = {}
            if _is_loopback(host) and not spec.address.startswith("ray://"):
                kwargs["_node_ip_address"] = host  # the driver is on that (loopback) node
            try:
                ray.init(address=spec.address, log_to_driver=False, **kwargs)
            except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError...
                raise UserError(
                    f"cannot join the Ray cluster at {spec.address}: {e}. If the cluster uses "
                    "token authentication, set RAY_AUTH_MODE=token and give its token "
                    "(RAY_AUTH_TOKEN or ~/.ray/auth_token)"
                ) from None
            cluster.joined = True
        else:
            cpus = spec.num_cpus or os.cpu_count() or 1
            ray.init(
                address="local",
                num_cpus=cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            cluster.owned = cluster.joined = True
        try:
            cluster._check_resources()
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _check_resources(self) -> None:
        import ray

        spec, total = self.spec, ray.cluster_resources()
        gpus, cpus = int(total.get("GPU", 0)), int(total.get("CPU", 0))
        where = f"the Ray cluster at {spec.address}" if spec.address else "the Ray instance"
        if spec.gpus and gpus == 0:
            raise UserError(
                f"GPUs were requested (--gpus / ray.gpus: true) but {where} has none; leave "
                "out --gpus to evaluate on CPUs"
            )
        self.use_gpu = gpus > 0 if spec.gpus is None else spec.gpus
        if self.use_gpu and spec.workers > gpus:
            raise UserError(
                f"{spec.workers} workers need one GPU each, but {where} has {gpus}; give "
                f"--workers {gpus}, or --no-gpus to evaluate on CPUs"
            )
        if not self.use_gpu and spec.workers > cpus:
            raise UserError(
                f"{spec.workers} workers need one CPU each, but {where} has {cpus}; give "
                f"--workers {max(cpus, 1)}"
                + ("" if spec.address else ", or a larger local instance with ray.num_cpus")
            )

    def close(self) -> None:
        import ray

        if self.joined and ray.is_initialized():
            ray.shutdown()  # a joined cluster keeps running: this only disconnects
        self.joined = self.owned = False
