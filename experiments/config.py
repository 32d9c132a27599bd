"""Experiment configuration: one TOML file per experiment, validated before any training.

A config has the tables ``[task]``, ``[model]``, ``[optim]``, ``[train]`` and an optional
``[sweep]`` of lists, plus the top-level keys ``name`` (results go to
``<output>/<name>/<run>/``) and ``output``. Every key has a default except ``task.name``;
unknown keys and bad values raise :class:`ConfigError` naming the file, the key and the
allowed values. See ``experiments/README.md`` for the reference.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "SCHEMA",
    "load_config",
    "validate",
    "expand_sweep",
    "apply_overrides",
    "parse_override",
    "read_override_value",
    "run_label",
    "Run",
    "NOT_IN_NAMES",
    "RESUMABLE_KEYS",
]

MISSING = object()


class ConfigError(ValueError):
    """A configuration error: names the file, the key, what is allowed and what was given."""


@dataclass(frozen=True)
class Field:
    default: Any
    check: Callable[[Any], Any]  # returns the normalised value or raises ValueError(allowed)
    doc: str


def _choice(*choices: str) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if not isinstance(v, str) or v not in choices:
            raise ValueError(f"one of {', '.join(repr(c) for c in choices)}")
        return v
    return check


def _int(low: int | None = None) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
            raise ValueError("an integer" + (f" >= {low}" if low is not None else ""))
        return v
    return check


def _float(positive: bool = False, nonnegative: bool = False,
           below_one: bool = False) -> Callable[[Any], Any]:
    """A finite number, optionally > 0 / >= 0, and with ``below_one`` < 1."""
    what = "a number" + (" > 0" if positive else " >= 0" if nonnegative else "")
    if below_one:
        what = "a number in [0, 1)" if nonnegative else what + " and < 1"

    def check(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(what)
        if (positive and v <= 0) or (nonnegative and v < 0) or (below_one and v >= 1):
            raise ValueError(what)
        return float(v)
    return check


def _bool(v: Any) -> Any:
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _str(v: Any) -> Any:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


def _name(v: Any) -> Any:
    """A folder name: letters, digits and ``_ . + -``, not ``.`` or ``..`` (no path tricks)."""
    if (not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", v)
            or v in (".", "..")):
        raise ValueError("a non-empty name of letters, digits and _ . + - (not '.' or '..')")
    return v


def _period(v: Any) -> Any:
    if isinstance(v, str) and v.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(v, float) and math.isinf(v) and v > 0:
        return math.inf
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError('an integer >= 1 or "inf" (a static trivialization)')
    return v


def _device(v: Any) -> Any:
    if not isinstance(v, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", v):
        raise ValueError("'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'")
    return v


TASKS = ("copying", "adding", "digits", "mnist")
DEFAULT_LENGTH = {"copying": 1000, "adding": 750}

SCHEMA: dict[str, dict[str, Field]] = {
    "task": {
        "name": Field(MISSING, _choice(*TASKS), "the task"),
        "length": Field(None, _int(1), "copying: L blanks; adding: T steps"),
        "permuted": Field(False, _bool, "pixel tasks: fixed seeded pixel permutation"),
        "permute_seed": Field(0, _int(0), "seed of the pixel permutation"),
        "path": Field("", _str, "mnist: folder with the four IDX files (gz or not)"),
    },
    "model": {
        "name": Field("orthogonal", _choice("orthogonal", "rnn", "lstm"), "the model"),
        "hidden": Field(128, _int(1), "hidden size"),
        "init": Field("henaff", _choice("henaff", "cayley", "haar"), "kernel initialisation"),
        "manifold": Field("orthogonal", _choice("orthogonal", "special_orthogonal"),
                          "manifold of the recurrent kernel"),
        "retraction": Field("expm", _str, "retraction of the manifold (see its retractions)"),
    },
    "optim": {
        "name": Field("rmsprop", _choice("rmsprop", "adam", "sgd", "riemannian_sgd",
                                         "riemannian_adam"), "optimizer"),
        "lr": Field(1e-3, _float(positive=True), "learning rate of unconstrained parameters"),
        "lr_orth": Field(1e-4, _float(positive=True), "learning rate of constrained parameters"),
        "K": Field(100, _period, "refresh period of the dynamic trivialization"),
        "state": Field("keep", _choice("keep", "reset"), "optimizer state at a refresh"),
        "momentum": Field(0.0, _float(nonnegative=True, below_one=True),
                          "momentum (rmsprop, sgd, riemannian_sgd), in [0, 1)"),
        # RMSprop keeps v <- alpha v + (1 - alpha) g^2: alpha = 1 never updates v (steps of
        # g / eps), alpha = 0 is v = g^2 (sign descent, a valid choice)
        "alpha": Field(0.99, _float(nonnegative=True, below_one=True),
                       "rmsprop smoothing constant, in [0, 1)"),
        "clip_grad": Field(0.0, _float(nonnegative=True), "gradient-norm clipping; 0 = off"),
    },
    "train": {
        "batch": Field(128, _int(1), "batch size"),
        "steps": Field(1000, _int(1), "optimizer steps"),
        "seed": Field(0, _int(0), "seed of the model init, data and everything else"),
        "device": Field("cpu", _device, "torch device"),
        "log_every": Field(10, _int(1), "steps between metrics.jsonl records"),
        "checkpoint_every": Field(200, _int(1), "steps between checkpoints"),
        "eval_every": Field(0, _int(0), "pixel tasks: steps between test evaluations (0 = end)"),
        "eval_batch": Field(1000, _int(1), "batch size of the test evaluation"),
        "threads": Field(0, _int(0), "torch CPU threads (0 = torch default)"),
    },
}
TOP_LEVEL: dict[str, Field] = {
    "name": Field(MISSING, _name, "experiment name (defaults to the file name)"),
    "output": Field("results", _str, "results folder"),
}
SECTIONS = (*SCHEMA, "sweep")


def _err(source: str, key: str, allowed: str, value: Any) -> ConfigError:
    return ConfigError(f"{source}: {key}: expected {allowed}, got {value!r}")


def _allowed_keys(section: str) -> str:
    return ", ".join(SCHEMA[section])


def _resolve_key(key: str, source: str, what: str = "sweep key") -> tuple[str, str]:
    """``"model.retraction"`` or a key that occurs in one table only (``"retraction"``);
    ``what`` names the key in errors (``"sweep key"``, ``"--set key"``)."""
    if "." in key:
        section, _, name = key.partition(".")
        if section not in SCHEMA:
            raise _err(source, key, f"a table among {', '.join(SCHEMA)}", section)
        if name not in SCHEMA[section]:
            raise _err(source, key, f"a key of [{section}]: {_allowed_keys(section)}", name)
        return section, name
    owners = [s for s in SCHEMA if key in SCHEMA[s]]
    if len(owners) != 1:
        every = ", ".join(f"{s}.{k}" for s in SCHEMA for k in SCHEMA[s])
        problem = "ambiguous, write table.key" if owners else "unknown"
        raise ConfigError(f"{source}: {what} {key!r} is {problem}; allowed: {every}")
    return owners[0], key


def validate(raw: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    """A complete, normalised copy of ``raw``; ``ConfigError`` on the first problem.

    Checks: known tables and keys, types and ranges, the retraction against the manifold's
    ``retractions``, task-specific keys, and (by validating every combination) the sweep.
    """
    cfg: dict[str, Any] = {}
    for key in raw:
        if key not in TOP_LEVEL and key not in SECTIONS:
            raise _err(source, key, f"a top-level key or table among "
                       f"{', '.join([*TOP_LEVEL, *SECTIONS])}", key)
    for key, field in TOP_LEVEL.items():
        value = raw.get(key, field.default)
        if value is MISSING:
            value = _default_name(source) if key == "name" else None
        try:
            cfg[key] = field.check(value)
        except ValueError as e:
            raise _err(source, key, str(e), value) from None
    for section, fields in SCHEMA.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise _err(source, section, "a table", table)
        for key in table:
            if key not in fields:
                raise _err(source, f"{section}.{key}",
                           f"a key of [{section}]: {_allowed_keys(section)}", key)
        out = {}
        for key, field in fields.items():
            value = table.get(key, field.default)
            if value is MISSING:
                raise ConfigError(f"{source}: {section}.{key} is required; "
                                  f"allowed: {_describe(field)}")
            if value is None:
                out[key] = None
                continue
            try:
                out[key] = field.check(value)
            except ValueError as e:
                raise _err(source, f"{section}.{key}", str(e), value) from None
        cfg[section] = out
    _check_combination(cfg, raw, source)
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, dict):
        raise _err(source, "sweep", "a table of lists", sweep)
    cfg["sweep"] = {}
    for key, values in sweep.items():
        section, name = _resolve_key(key, source)
        if not isinstance(values, list) or not values:
            raise _err(source, f"sweep.{key}", "a non-empty list of values", values)
        cfg["sweep"][f"{section}.{name}"] = list(values)
    for overrides in _combinations(cfg["sweep"]) if cfg["sweep"] else []:
        base = copy.deepcopy(raw)
        base.pop("sweep", None)
        try:
            validate(_set(base, overrides), source)
        except ConfigError as e:
            raise ConfigError(f"{e} (in sweep combination {overrides})") from None
    return cfg


def _describe(field: Field) -> str:
    try:
        field.check(object())
    except ValueError as e:
        return str(e)
    return "any value"  # pragma: no cover


def _check_combination(cfg: dict[str, Any], raw: dict[str, Any], source: str) -> None:
    task, model, optim = cfg["task"], cfg["model"], cfg["optim"]
    raw_task = raw.get("task", {})
    if task["name"] in DEFAULT_LENGTH:
        if task["length"] is None:
            task["length"] = DEFAULT_LENGTH[task["name"]]
        if task["name"] == "adding" and task["length"] < 2:
            raise _err(source, "task.length", "an integer >= 2 for the adding problem",
                       task["length"])
        for key in ("permuted", "path"):
            if task[key] != SCHEMA["task"][key].default:
                raise _err(source, f"task.{key}", "no value: it applies to digits/mnist only",
                           raw_task[key])
    else:
        if task["length"] is not None:
            raise _err(source, "task.length",
                       "no value: the pixel tasks' length is the image size", task["length"])
        if task["name"] == "mnist" and not task["path"]:
            raise ConfigError(
                f"{source}: task.path: expected the folder holding the MNIST IDX files "
                "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                "t10k-labels-idx1-ubyte; gz or not), got nothing; nothing is downloaded at run "
                'time (task.name = "digits" needs no files)'
            )
    riemannian = optim["name"].startswith("riemannian")
    if model["name"] != "orthogonal" and riemannian:
        raise _err(source, "optim.name", "rmsprop, adam or sgd for an unconstrained "
                   f"{model['name']!r} model", optim["name"])
    # checked for every model (an unconstrained one ignores it, but a typo is still a typo)
    from .backend import retractions_of

    allowed = retractions_of(model["manifold"], model["hidden"])
    if model["retraction"] not in allowed:
        raise _err(source, "model.retraction",
                   f"a retraction of {model['manifold']} ({', '.join(allowed)})",
                   model["retraction"])


def _set(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    return raw


def _combinations(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*sweep.values())]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return str(value)


def _short(key: str) -> str:
    section, _, name = key.partition(".")
    return section if name == "name" else name


# Keys that change how a run executes or logs, not what it computes: not part of run names.
NOT_IN_NAMES = ("train.device", "train.threads", "train.log_every", "train.checkpoint_every",
                "train.eval_batch")

# Keys that ``--resume`` lets change (checked by ``train``): more steps (extending a run), and
# keys that change how a run executes, not what it computes or what its log records. (A
# different device or thread count may change the rounding of the results, so exact
# reproduction needs the same ones.) None of them is part of a run's name unless the config
# file's ``[sweep]`` lists it, so ``--resume --set train.steps=N`` extends a run in its folder.
RESUMABLE_KEYS = ("train.steps", "train.threads", "train.device", "train.checkpoint_every",
                  "train.eval_batch", "task.path")  # task.path: where the data lives


def _default_name(source: str) -> str:
    """The name of an experiment whose file sets none: the file's name without its suffix,
    each run of characters outside letters, digits and ``_ . + -`` made ``_`` (as in run
    folder names: ``my exp (v2).toml`` -> ``my_exp_v2_``)."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", Path(source).stem)
    return name if name.strip(".") else "experiment"


def _label_value(value: Any) -> str:
    """``value`` as one safe folder-name part: every run of characters other than letters,
    digits and ``_ . + -`` becomes ``_`` (``/data/mnist`` -> ``_data_mnist``)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", _fmt(value))


def run_label(overrides: dict[str, Any], seed: int,
              swept: Collection[str] = ()) -> tuple[str, str]:
    """``(run, group)`` names from the swept keys, e.g. ``"retraction=expm_K=100_seed=0"``.

    The group is the run name without the seed; runs of one group differ only in their seed.
    Keys in ``NOT_IN_NAMES`` (device, threads, logging periods) are left out, and so are the
    other ``RESUMABLE_KEYS`` (``train.steps``, ``task.path``) unless ``swept`` (the keys of
    the config file's ``[sweep]`` table) holds them: ``--resume --set train.steps=N`` extends
    a run in its folder, while the runs of a sweep over ``train.steps`` keep distinct names
    (and the ``run`` commands that reproduce them name the same folders). Values are reduced
    to safe characters, so a label is always one folder (never ``a/b`` or ``..``).
    """
    parts = [f"{_short(key)}={_label_value(v)}" for key, v in overrides.items()
             if key != "train.seed" and key not in NOT_IN_NAMES
             and (key not in RESUMABLE_KEYS or key in swept)]
    group = "_".join(parts) or "default"
    return "_".join([*parts, f"seed={seed}"]), group


@dataclass
class Run:
    """One resolved run: its config (with a ``run`` table) and where it writes."""

    config: dict[str, Any]
    overrides: dict[str, Any]
    source: str

    @property
    def name(self) -> str:
        return self.config["run"]["name"]

    @property
    def directory(self) -> Path:
        return Path(self.config["output"]) / self.config["name"] / self.name


def _resolve(raw: dict[str, Any], overrides: dict[str, Any], source: str,
             cli: dict[str, Any] | None = None, swept: Collection[str] = ()) -> Run:
    """The run of ``raw`` with ``overrides`` applied; ``cli`` are those given with ``--set``
    (named in errors, as ``FILE with --set KEY=VALUE ...``); ``swept``: the keys of the
    file's ``[sweep]`` table (see :func:`run_label`)."""
    base = copy.deepcopy(raw)
    base.pop("sweep", None)
    base.setdefault("name", _default_name(source))  # before ``source`` grows a --set suffix
    where = source
    if cli:
        where = f"{source} with --set " + " ".join(f"{k}={_fmt(v)}" for k, v in cli.items())
    cfg = validate(_set(base, overrides), where)
    cfg.pop("sweep")
    # named by the checked values: `--set optim.K=Inf` and `optim.K=inf` are one run, one folder
    checked = {k: cfg[k.partition(".")[0]][k.partition(".")[2]] for k in overrides}
    run, group = run_label(checked, cfg["train"]["seed"], swept)
    cfg["run"] = {"name": run, "group": group, "source": source,
                  "overrides": {k: _fmt(v) if isinstance(v, float) else v
                                for k, v in overrides.items()}}
    return Run(cfg, overrides, source)


def read_override_value(text: str) -> Any:
    """The value of ``KEY=text`` as ``--set`` reads it: as TOML, else as the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(text: str, source: str = "--set") -> tuple[str, Any]:
    """``"optim.K=100"`` -> ``("optim.K", 100)``; the value is read as TOML, else as a string
    (:func:`read_override_value`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: expected KEY=VALUE (e.g. optim.K=100), got {text!r}")
    parsed = read_override_value(value)
    section, name = _resolve_key(key.strip(), source, "--set key")
    try:  # the value on its own (its combination with the file is checked later)
        SCHEMA[section][name].check(parsed)
    except ValueError as e:
        raise _err(source, f"{section}.{name}", str(e), parsed) from None
    return f"{section}.{name}", parsed


def apply_overrides(raw: dict[str, Any], pairs: list[str],
                    source: str = "--set") -> dict[str, Any]:
    """The parsed ``KEY=VALUE`` strings as a ``{"table.key": value}`` dict.

    Each value is checked on its own here (errors name ``source``, ``--set``); its
    combination with the rest of the config is validated when the run is resolved.
    """
    return dict(parse_override(p, source) for p in pairs)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The raw table of a TOML file; ``ConfigError`` naming the file on a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_config(path: str | Path, overrides: list[str] | None = None,
                output: str | None = None) -> Run:
    """The single run ``path`` describes (its ``[sweep]`` ignored), with ``--set`` overrides.

    The ``[sweep]`` table only decides whether a ``--set`` of ``train.steps`` or ``task.path``
    is part of the run name (see :func:`run_label`), so that the commands of ``sweep
    --print-commands`` name the folders of the sweep.
    """
    raw = read_toml(path)
    if output is not None:
        raw["output"] = output
    cfg = validate(raw, str(path))  # the whole file, sweep included, before anything runs
    cli = apply_overrides(raw, overrides or [])
    return _resolve(raw, cli, str(path), cli, cfg["sweep"])


def expand_sweep(path: str | Path, overrides: list[str] | None = None,
                 output: str | None = None) -> list[Run]:
    """Every run of the ``[sweep]`` table (the product of its lists, in file order).

    ``overrides`` fix keys for all runs (a key both swept and overridden takes the override);
    like ``run``'s, a fixed ``train.steps`` or ``task.path`` keeps the run names unless the
    file's ``[sweep]`` lists the key, so ``sweep --resume --set train.steps=N`` extends every
    run of the sweep in its folder.
    """
    raw = read_toml(path)
    if output is not None:
        raw["output"] = output
    cfg = validate(raw, str(path))
    fixed = apply_overrides(raw, overrides or [])
    sweep = {k: v for k, v in cfg["sweep"].items() if k not in fixed}
    runs = [_resolve(raw, {**combo, **fixed}, str(path), fixed, cfg["sweep"])
            for combo in _combinations(sweep)]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # repeated values, or values equal once sanitized
        twice = sorted({n for n in names if names.count(n) > 1})
        unnamed = [k for k in sweep if k in NOT_IN_NAMES]
        hint = (f"; {', '.join(unnamed)} never enter run names (they change how a run "
                "executes, not what it computes): run one sweep per value, each with its own "
                "--output" if unnamed else "")
        raise ConfigError(
            f"{path}: [sweep]: expected combinations with distinct run names (one folder "
            f"each), got {len(names) - len(set(names))} repeated: {', '.join(twice[:5])}; "
            "remove repeated values, or values that differ only in characters a folder name "
            f"cannot hold{hint}")
    return runs
