"""Data-parallel training of one large run with ``torchrun`` (DDP; gloo on CPU, nccl on GPU).

``torchrun --nproc_per_node N -m experiments run CONFIG`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``; :func:`setup` reads them, initialises
the process group and tells the trainer its rank. Each rank draws its own share of the
batch from its own data stream (seed offset by the rank), the gradients are averaged by
``DistributedDataParallel``, and rank 0 alone writes logs and checkpoints.

When every rank is on this host (``MASTER_ADDR`` is a loopback address, torchrun's
single-node default), gloo uses the loopback interface unless ``GLOO_SOCKET_IFNAME`` says
otherwise. By default it takes the address the hostname resolves to, which on sandboxed or
firewalled machines may be one its peers cannot reach; the ranks then wait for each other
until the 30-minute timeout.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "teardown", "from_env", "gloo_interface",
           "loopback_interface"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        """The mean of ``values`` over the ranks (identity when not distributed)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def all_gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when not distributed)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def from_env(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun variables (``(0, 1, 0)`` if unset)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local = int(env.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"WORLD_SIZE/RANK: expected 0 <= RANK < WORLD_SIZE, got {rank}/{world}")
    return rank, world, local


def loopback_interface() -> str:
    """The name of this host's loopback interface (``lo`` on Linux, ``lo0`` on macOS)."""
    try:
        names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    except OSError:  # no interface list (some sandboxes)
        names = []
    return names[0] if names else "lo"


def _is_loopback(address: str) -> bool:
    host = address.strip("[]")  # an IPv6 address may come bracketed
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname: may be any interface's
        return False


def gloo_interface(env: dict[str, str] | None = None) -> str | None:
    """The interface gloo should use: the loopback one when ``MASTER_ADDR`` is a loopback
    address and ``GLOO_SOCKET_IFNAME`` is unset, else ``None`` (gloo's own choice)."""
    env = os.environ if env is None else env
    if env.get("GLOO_SOCKET_IFNAME") or not _is_loopback(env.get("MASTER_ADDR", "")):
        return None
    return loopback_interface()


def setup(device: torch.device) -> DistInfo:
    """Initialise the process group when launched by torchrun with more than one process."""
    rank, world, local = from_env()
    if world == 1:
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, owns_group=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
    elif (interface := gloo_interface()) is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, owns_group=True)


def teardown(info: DistInfo, finished: bool = False) -> None:
    """Destroy the process group this process created.

    ``finished``: every rank ends normally, so they first meet at a barrier and none tears
    its connections down while another still reads or writes (rank 0 writes the last
    checkpoint after the others are done). After an error there is no barrier: the other
    ranks may never arrive.
    """
    if info.owns_group and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
