"""Shared helpers for the harness tests: tiny configs written to a temporary folder."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

TINY = {
    "name": "tiny",
    "task": {"name": "copying", "length": 5},
    "model": {"name": "orthogonal", "hidden": 8, "init": "henaff", "retraction": "expm"},
    "optim": {"name": "rmsprop", "lr": 1e-2, "lr_orth": 1e-2, "K": 7},
    "train": {"batch": 8, "steps": 30, "seed": 3, "log_every": 5, "checkpoint_every": 10,
              "threads": 1},
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: dict) -> str:
    """A TOML document of a dict of scalars and one level of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for table, body in cfg.items():
        if isinstance(body, dict):
            lines.append(f"\n[{table}]")
            lines += [f'"{k}" = {_toml_value(v)}' if "." in k else f"{k} = {_toml_value(v)}"
                      for k, v in body.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def write_config(tmp_path: Path):
    """``write_config(**changes)`` -> path of a tiny config (``changes``: table -> dict)."""

    def write(name: str = "tiny.toml", base: dict | None = None, **changes) -> Path:
        cfg = copy.deepcopy(TINY if base is None else base)
        cfg["output"] = str(tmp_path / "results")
        for table, body in changes.items():
            if isinstance(body, dict):
                cfg.setdefault(table, {}).update(body)
            else:
                cfg[table] = body
        path = tmp_path / name
        path.write_text(to_toml(cfg))
        return path

    return write


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
