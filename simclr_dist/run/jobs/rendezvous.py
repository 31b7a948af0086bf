"""The process group of a run on a loopback Ray rendezvouses on loopback too.

Ray Train's TorchConfig starts the process group's rendezvous, torch.distributed's TCPStore, in rank 0 at
MASTER_ADDR:MASTER_PORT; but torch 2.14's TCPStore server binds ``::`` (all interfaces) whatever MASTER_ADDR says:
it has no bind-address option. It does take over a socket it is handed (``master_listen_fd``). So when rank 0's
node IP is a loopback address (a Ray started by :func:`simclr_dist.run.jobs.launch.bind_to_loopback`, whose workers
all reach rank 0 at 127.0.0.1: that is Ray Train's own MASTER_ADDR there), rank 0 binds a socket to that address
itself and hands it to the TCPStore server; the other ranks join it as clients, and the process group is created
over it as Ray Train's ``env://`` rendezvous creates it (the same backend, ranks, world size and timeout, the same
``default_pg`` key prefix, MASTER_ADDR/MASTER_PORT and RANK/LOCAL_RANK/... set in every worker). Gloo's pair
sockets (and NCCL's bootstrap) are pinned to the loopback interface as well (GLOO_SOCKET_IFNAME,
NCCL_SOCKET_IFNAME), unless already set. Any other run (a cluster: a routable node IP) takes Ray Train's setup
unchanged. Ray Train calls it in its controller, with Ray 2.60's backend interface (``_TorchBackend``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from typing import Any

import psutil
import ray
import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_server: Any = None  # rank 0's TCPStore server, from its creation until the process group holds it


def is_loopback_address(ip: str) -> bool:
    """127.0.0.0/8, ::1, an IPv4-mapped loopback; False for anything else (a routable address, not an address)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def interface_of(ip: str) -> str | None:
    """The network interface that holds ``ip`` (``lo`` on Linux, ``lo0`` on macOS), None when none does."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == ip for a in addrs):
            return name
    return None


def serve_store(addr: str, world_size: int, timeout_s: float) -> int:
    """In rank 0: a TCPStore server listening on ``addr`` only (not ``::``); returns its port."""
    global _server
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    _server = dist.TCPStore(addr, port, world_size, True, datetime.timedelta(seconds=timeout_s),
                            wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.detach())
    return port


def join_process_group(backend: str, rank: int, world_size: int, addr: str, port: int, timeout_s: float) -> None:
    """In every rank: what Ray Train's ``_setup_torch_process_group`` does for ``env://``, over the store above."""
    global _server
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    interface = interface_of(addr)
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    if backend == "nccl" and not {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"} & set(os.environ):
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # as Ray Train: a timed-out collective fails the run
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        store, _server = _server, None
    else:
        store = dist.TCPStore(addr, port, world_size, False, timeout, multi_tenant=True)
    store.set_timeout(timeout)
    # init_process_group wraps the store in PrefixStore("default_pg"), as after an env:// rendezvous
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend; a process group whose rank 0 is on a loopback node IP rendezvouses on it."""

    def on_start(self, worker_group, backend_config) -> None:
        addr = worker_group.execute_single(0, ray.util.get_node_ip_address)
        if not is_loopback_address(addr) or backend_config.backend not in ("gloo", "nccl"):
            return super().on_start(worker_group, backend_config)
        n, timeout_s = len(worker_group), backend_config.timeout_s
        port = worker_group.execute_single(0, serve_store, addr, n, timeout_s)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, WORLD_SIZE, ... as Ray Train
        ray.get([worker_group.execute_single_async(i, join_process_group, backend_config.backend, i, n, addr, port,
                                                   timeout_s) for i in range(n)])


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose backend is :class:`LoopbackTorchBackend`."""

    @property
    def backend_cls(self):
        return LoopbackTorchBackend


def torch_config(backend: str) -> TorchConfig:
    """Ray Train's TorchConfig for ``backend`` (gloo or nccl), with the process group kept on loopback when the
    run's Ray is (see above), Ray Train's own otherwise."""
    return LoopbackTorchConfig(backend=backend)
