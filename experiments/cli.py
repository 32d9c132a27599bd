"""Command line: ``python -m experiments {run, sweep, report, demo}``.

::

    python -m experiments run CONFIG [--set KEY=VALUE ...] [--resume | --overwrite]
    python -m experiments sweep CONFIG [--jobs N] [--print-commands] [--resume | --overwrite]
    python -m experiments report DIR
    python -m experiments demo [--jobs N] [--output DIR] [--set KEY=VALUE ...]

``run`` trains the configuration of CONFIG (its ``[sweep]`` table is ignored; ``--set``
changes single keys, e.g. ``--set optim.K=10``, and names them in the run's folder, except
execution-only keys, ``train.steps`` and ``task.path``, so ``--resume --set train.steps=N``
extends a run in its folder). Under ``torchrun`` a run is data-parallel.
``sweep`` runs every combination of the ``[sweep]`` table, ``--jobs`` at a time, or with
``--print-commands`` prints one ``run`` command per combination for a scheduler.

Exit status: 0 done; 1 a run failed or diverged (one line naming the step and what went
non-finite), or a file/folder problem; 2 a configuration error; 130 interrupted (Ctrl-C) and
143 terminated (SIGTERM, handled the same way); the message gives the command that continues
with ``--resume``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from importlib import resources
from pathlib import Path

from .config import NOT_IN_NAMES, RESUMABLE_KEYS, ConfigError, expand_sweep, load_config
from .sweep import Terminated, terminate_as_interrupt

__all__ = ["main", "build_parser", "demo_config_path"]


def demo_config_path() -> Path:
    """The packaged configuration of ``python -m experiments demo``."""
    return Path(str(resources.files("experiments") / "configs" / "demo.toml"))


_SET_HELP = (
    "override one key, e.g. optim.K=10 or model.retraction=cayley; KEY=VALUE becomes part of "
    f"the run's folder name, except for {', '.join(NOT_IN_NAMES)} and (unless CONFIG's "
    f"[sweep] lists them) {' and '.join(k for k in RESUMABLE_KEYS if k not in NOT_IN_NAMES)}"
    ", so --resume --set train.steps=N extends a run in its folder")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=_SET_HELP)
    p.add_argument("--output", default=None, help="results folder (default: the config's)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted run from its checkpoint; with --set "
                           "train.steps=N, extend it to N steps in the same folder")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the run's earlier files first (others in its folder stay)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments",
                                     description="dtriv research harness")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train one configuration")
    _add_common(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("sweep", help="train every combination of the [sweep] table")
    _add_common(p)
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="runs in parallel (processes)")
    p.add_argument("--print-commands", action="store_true",
                   help="print one `run` command per combination instead of running")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")

    p = sub.add_parser("report", help="summary.md and plots of the runs below DIR")
    p.add_argument("directory", help="a results folder (e.g. results/copying)")

    p = sub.add_parser("demo", help="short copying-task sweep (2 retractions x 2 K) + report")
    p.add_argument("--output", default="results", help="results folder (default: results)")
    p.add_argument("--jobs", type=_positive_int, default=min(2, os.cpu_count() or 1),
                   help="runs in parallel (default: 2, or 1 on a machine with one CPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change one key of the demo's configuration (e.g. train.steps=100)")
    return parser


def _positive_int(text: str) -> int:
    """``--jobs``: a positive integer (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    from .train import train

    run = load_config(args.config, args.overrides, args.output)
    final = train(run, resume=args.resume, overwrite=args.overwrite,
                  progress=not args.no_progress)
    if final:
        _print_final(run.directory, final)
    return 0


def _print_final(directory: Path, final: dict) -> None:
    line = f"{directory}: step {final.get('step')} loss {final.get('loss', float('nan')):.4f}"
    if final.get("baseline") is not None:
        line += f" (baseline {final['baseline']:.4f})"
    if final.get("test_accuracy") is not None:
        line += f" test accuracy {final['test_accuracy']:.4f}"
    if final.get("constraint_error") is not None:
        line += f" constraint error {final['constraint_error']:.2e}"
    print(line)


def _sweep(config: str | Path, overrides: list[str], output: str | None, jobs: int,
           resume: bool, overwrite: bool, do_report: bool) -> int:
    from .report import report
    from .sweep import run_all

    runs = expand_sweep(config, overrides, output)
    print(f"{len(runs)} runs of {config}, {min(jobs, len(runs))} at a time")
    results = run_all(runs, jobs=jobs, resume=resume, overwrite=overwrite,
                      progress=jobs == 1)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"--- {r['run']} failed:\n{r['error']}", file=sys.stderr)
    if do_report:
        folder = Path(runs[0].config["output"]) / runs[0].config["name"]
        summary, plots = report(folder)
        print()
        print(summary.read_text())
        print(f"wrote {summary} and {', '.join(p.name for p in plots)}")
    return 1 if failed else 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import commands

    if args.print_commands:
        runs = expand_sweep(args.config, args.overrides, args.output)
        extra = ["--output", args.output] if args.output else []
        extra += ["--resume"] if args.resume else ["--overwrite"] if args.overwrite else []
        for line in commands(runs, args.config, extra):
            print(line)
        return 0
    return _sweep(args.config, args.overrides, args.output, args.jobs, args.resume,
                  args.overwrite, not args.no_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    summary, plots = report(args.directory)
    print(summary.read_text())
    print(f"wrote {summary} and {', '.join(str(p) for p in plots)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    # --resume: a finished earlier demo run is kept as it is (the runs are deterministic, so
    # training it again would give the same logs), an interrupted one continues, and a folder
    # holding a run of another configuration stops the demo with the differences listed,
    # nothing changed
    code = _sweep(demo_config_path(), args.overrides, args.output, args.jobs, resume=True,
                  overwrite=False, do_report=True)
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return code


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that continues an interrupted ``run``/``sweep`` with ``--resume``."""
    if args.command not in ("run", "sweep"):
        return ""
    argv = [sys.executable, "-m", "experiments", args.command, args.config]
    for pair in args.overrides:
        argv += ["--set", pair]
    if args.output:
        argv += ["--output", args.output]
    if getattr(args, "jobs", 1) != 1:
        argv += ["--jobs", str(args.jobs)]
    return shlex.join([*argv, "--resume"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": _cmd_run, "sweep": _cmd_sweep, "report": _cmd_report, "demo": _cmd_demo}
    previous = terminate_as_interrupt()  # SIGTERM (a scheduler, kill) stops as Ctrl-C does
    try:
        return handlers[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # FloatingPointError: a diverged run (train.DivergedError)
    except (FileNotFoundError, ImportError, ValueError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        command = _resume_command(args)
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}; " + (f"continue with: {command}" if command else "stopped"),
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
