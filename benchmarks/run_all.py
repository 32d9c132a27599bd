"""Run every benchmark of dtriv with its default sizes, one after the other.

Each script prints its own table (times and ratios against torch, geotorch and geoopt).
Extra arguments are passed to every script, e.g. ``--threads 1``.
Usage: ``python benchmarks/run_all.py [--only NAME ...] [-- extra args]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "expm": "bench_expm.py",
    "stiefel": "bench_stiefel_retractions.py",
    "orthogonal": "bench_orthogonal.py",
    "optim": "bench_optim.py",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), default=list(SCRIPTS))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for every script")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    status = 0
    for name in args.only:
        print(f"\n=== {name}: {SCRIPTS[name]} {' '.join(extra)}", flush=True)
        result = subprocess.run([sys.executable, str(HERE / SCRIPTS[name]), *extra])
        status = status or result.returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
