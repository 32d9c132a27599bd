"""DistributedDataParallel: two gloo processes on CPU with the wrapper at K = 5 keep their
parameters and bases identical, equal to one process on the concatenated batch.

The ranks talk over the loopback interface only (``GLOO_SOCKET_IFNAME``), so the hostname's
address plays no part. Nothing here can hang the suite: each rank has a watchdog that dumps
its Python stacks and exits after ``WATCHDOG_S``, the parent gives up at ``DEADLINE_S``, and
the failure carries the ranks' stacks. When the ranks cannot even connect (a sandbox without
loopback TCP), the test is skipped with that evidence instead of failing.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessException
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrizations as P

from dtriv.manifolds import Orthogonal, Stiefel
from dtriv.optim import DynamicTrivialization
from dtriv.parametrize import constrain
from experiments.distributed import loopback_interface

DT = torch.float64
STEPS, K, BATCH, WORLD = 20, 5, 8, 2
WATCHDOG_S, DEADLINE_S = 120.0, 180.0  # the run takes ~6 s on 2 cores


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 3)
    ).to(DT)
    constrain(model[0], "weight", Stiefel(8, 4))
    constrain(model[2], "weight", Orthogonal(8))
    P.orthogonal(model[4], "weight")  # torch's parametrization (3 x 8, wide)
    return model


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return (torch.randn(BATCH, 4, generator=g, dtype=DT),
            torch.randn(BATCH, 3, generator=g, dtype=DT))


def _train(model, forward, rank: int, world: int) -> DynamicTrivialization:
    opt = DynamicTrivialization(torch.optim.Adam(model.parameters(), lr=0.05), K=K,
                                modules=model)
    assert len(opt.targets) == 3
    share = BATCH // world
    for t in range(STEPS):
        x, y = _batch(t)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad()
        ((forward(x) - y) ** 2).mean().backward()
        opt.step()
    assert opt.refreshes == STEPS // K
    return opt


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    with open(os.path.join(out, f"rank{rank}.stacks"), "w") as stacks:
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True, file=stacks)
        torch.set_num_threads(1)
        os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=WATCHDOG_S / 2))
        try:
            dist.barrier()
            Path(out, f"rank{rank}.connected").touch()
            model = _model()
            ddp = DistributedDataParallel(model)
            _train(model, ddp, rank, world)
            torch.save(_state(model), os.path.join(out, f"rank{rank}.pt"))
        finally:
            dist.destroy_process_group()
            faulthandler.cancel_dump_traceback_later()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out: Path) -> None:
    """Run ``_rank_main`` on ``WORLD`` processes; fail (or skip, if they never connected)
    with their stacks when one fails or the deadline passes."""
    context = mp.start_processes(_rank_main, args=(WORLD, _free_port(), str(out)),
                                 nprocs=WORLD, join=False)
    deadline, error = time.monotonic() + DEADLINE_S, None
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                error = f"the ranks did not finish within {DEADLINE_S:.0f} s"
                break
    except ProcessException as exc:
        error = str(exc)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    if error is None:
        return
    stacks = "\n".join(f"--- rank {r} ---\n" + (out / f"rank{r}.stacks").read_text()
                        for r in range(WORLD) if (out / f"rank{r}.stacks").exists())
    report = f"{error}\n{stacks}"
    if not all((out / f"rank{r}.connected").exists() for r in range(WORLD)):
        pytest.skip(f"gloo ranks could not connect over loopback here: {report}")
    pytest.fail(report)


def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    _run_ranks(tmp_path)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = _model()
    initial = _state(model)
    _train(model, model, 0, 1)
    single = _state(model)

    keys = [k for k in single if k.endswith("base") or "original" in k or k.endswith("bias")]
    assert any(k.endswith("base") for k in keys) and len(keys) >= 8
    for key in single:
        assert torch.equal(states[0][key], states[1][key]), key  # ranks agree exactly
        torch.testing.assert_close(states[0][key], single[key], rtol=0, atol=1e-6)
    for key in (k for k in keys if k.endswith("base")):
        assert (single[key] - initial[key]).abs().max() > 1e-3, key  # the bases moved
