"""Run the benchmark suite and collect its tables into one markdown report.

Each script runs in its own process (its thread count and memory are its own) with
``--markdown`` pointing at a temporary file; the sections are gathered, under a header
that names the machine, the thread count and the library versions, into
``benchmarks/RESULTS.md`` (``--out``). ``--quick`` runs every script's small subset (about
a minute in all). ``--readme`` also replaces the section between the markers
``<!-- bench:start -->`` and ``<!-- bench:end -->`` of the top-level README with the
report's summary table (the ``summary`` sections).

Usage::

    python benchmarks/run_all.py [--quick] [--only NAME ...] [--readme] [-- extra args]

Extra arguments after ``--`` are passed to every script (e.g. ``-- --threads 1``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

SCRIPTS = {
    "orthogonal": "bench_orthogonal.py",
    "expm": "bench_expm.py",
    "tall": "bench_tall.py",
    "rnn": "bench_rnn.py",
    "optim": "bench_optim.py",
    "sphere_spectral": "bench_sphere_spectral.py",
    "kernels": "bench_kernels.py",
}
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def replace_between_markers(text: str, body: str) -> str:
    """``text`` with what lies between :data:`START` and :data:`END` replaced by ``body``."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"README: expected the markers {START} ... {END}, not found")
    return text[: i + len(START)] + "\n" + body.strip() + "\n" + text[j:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS))
    parser.add_argument("--quick", action="store_true", help="each script's small subset")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report (default benchmarks/RESULTS.md, "
                             "benchmarks/RESULTS-quick.md with --quick)")
    parser.add_argument("--readme", action="store_true",
                        help="copy the summary into the README between the bench markers")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for every script")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    partial = set(args.only) != set(SCRIPTS)
    if args.readme and (args.quick or partial):
        parser.error("--readme: the README shows a full run; got "
                     + ("--quick" if args.quick else f"--only {' '.join(args.only)}"))
    default = "RESULTS-quick.md" if args.quick else (
        "RESULTS-partial.md" if partial else "RESULTS.md")
    out = args.out or HERE / default
    status = 0
    sections: list[str] = []
    summary: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            script = HERE / SCRIPTS[name]
            if not script.exists():
                print(f"\n=== {name}: {script.name} is missing, skipped", flush=True)
                status = 1
                continue
            md = Path(tmp) / f"{name}.md"
            cmd = [sys.executable, str(script), "--markdown", str(md), *extra]
            if args.quick:
                cmd.append("--quick")
            print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            result = subprocess.run(cmd, cwd=ROOT)
            took = time.perf_counter() - t0
            if result.returncode != 0:
                print(f"=== {name} failed with exit status {result.returncode}", flush=True)
                status = status or result.returncode
            text = md.read_text(encoding="utf-8") if md.exists() else ""
            sections.append(f"## {name} (`{script.name}`, {took:.0f} s)\n\n{text}")
            summary += [block for block in text.split("\n### ")
                        if block.lstrip("# ").lower().startswith("summary")]
    total = time.perf_counter() - start
    # the conditions the scripts ran under: the options passed to every one of them
    shared, _ = harness.parser("").parse_known_args(extra)
    env = harness.environment(shared.device)
    if shared.threads is not None:
        env["threads"] = str(shared.threads)
    command = " ".join(["python benchmarks/run_all.py", *(["--quick"] if args.quick else []),
                        *(["--only", *args.only] if partial else []),
                        *(["--", *extra] if extra else [])])
    header = (
        "# dtriv benchmark results\n\n"
        f"`{command}`, "
        f"{total / 60:.1f} min. Ratios are peer time / dtriv time (above 1: dtriv is "
        "faster), each the median of the per-round ratios of one run in which every round "
        "calls each implementation once, in an order shuffled from round to round; "
        "times are medians with ± half the interquartile range. The thread count below is "
        "the scripts' (`--threads`, else torch's default); the RNN tables run at 1 and 2 "
        "threads and say so.\n\n"
        + harness.md_table(list(env), [list(env.values())]) + "\n\n"
    )
    out.write_text(header + "\n".join(sections), encoding="utf-8")
    print(f"\nwrote {out} ({total:.0f} s)")
    if args.readme and status:
        print("README.md left as it was: a script failed (see above)")
    elif args.readme:
        readme = ROOT / "README.md"
        body = ("\n\n".join("### " + s.lstrip("# ").strip() for s in summary)
                or "(no summary sections)")
        body = (f"Latest `make bench` ({env['date']}, {env['machine']}, {env['threads']} "
                f"threads, torch {env['torch']}, dtriv {env['dtriv']}, geotorch "
                f"{env['geotorch']}, geoopt {env['geoopt']}; full report: "
                f"[benchmarks/RESULTS.md](benchmarks/RESULTS.md)).\n\n" + body)
        readme.write_text(replace_between_markers(readme.read_text(encoding="utf-8"), body),
                          encoding="utf-8")
        print(f"updated {readme}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
