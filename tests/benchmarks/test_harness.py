"""The benchmark harness: statistics, tables, report assembly (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


harness = _load("harness")
run_all = _load("run_all")
bench_tall = _load("bench_tall")


def test_timing_median_and_quartiles():
    samples = [5.0, 1.0, 3.0, 2.0, 4.0]
    t = harness.Timing.of(samples)
    assert t.median == statistics.median(samples) == 3.0
    assert (t.q1, t.q3) == (2.0, 4.0)
    assert t.spread == pytest.approx(2.0 / 3.0)
    assert t.n == 5
    assert str(t) == "3 s ±33%"


def test_timing_rejects_no_samples():
    with pytest.raises(ValueError, match="samples"):
        harness.Timing.of([])


def test_measure_interleaves_and_counts_rounds():
    """Each round calls every case once; over the rounds every case directly follows every
    other one within a round (a rotation of one order kept each case's neighbours: with five
    cases, dtriv never ran after geotorch); the order repeats from run to run."""
    names = "abcde"

    def record(calls: list[str]) -> dict:
        return {c: (lambda c=c: calls.append(c)) for c in names}

    calls: list[str] = []
    out = harness.measure(record(calls), repeats=39, warmup=1, budget_s=100.0)
    rounds = ["".join(calls[i:i + 5]) for i in range(0, len(calls), 5)]
    assert len(rounds) == 40 and all(sorted(r) == list(names) for r in rounds)
    follows = [r[i - 1] + r[i] for r in rounds for i in range(1, 5)]
    pairs = [x + y for x in names for y in names if x != y]
    counts = [follows.count(p) for p in pairs]
    assert min(counts) >= 2 and max(counts) <= 16  # 8 on average
    assert out["a"].n == out["e"].n == 39
    again: list[str] = []
    harness.measure(record(again), repeats=39, warmup=1, budget_s=100.0)
    assert again == calls


def test_ratio_and_table():
    fast, slow = harness.Timing.of([1.0]), harness.Timing.of([2.5])
    assert harness.ratio(slow, fast) == "2.5x"
    assert harness.ratio(None, fast) == "-"
    table = harness.md_table(["x", "y"], [["1", "2"]])
    assert table.splitlines() == ["| x | y |", "|---|---|", "| 1 | 2 |"]
    with pytest.raises(ValueError, match=r"rows\[0\]"):
        harness.md_table(["x"], [["1", "2"]])


def test_paired_ratio_is_the_median_of_the_per_round_ratios():
    # the machine slows down 3x over the rounds; dtriv is 2x faster in every round
    peer = harness.Timing.of([2.0, 4.0, 6.0], 7)
    ours = harness.Timing.of([1.0, 2.0, 3.0], 7)
    assert harness.paired_ratio(peer, ours) == 2.0
    # rounds of ratio 2, 1, 2, 2, 1: the paired ratio is 2, the ratio of the medians 1.2
    peer = harness.Timing.of([1.0, 3.0, 2.0, 5.0, 4.0], 8)
    ours = harness.Timing.of([0.5, 3.0, 1.0, 2.5, 4.0], 8)
    assert harness.paired_ratio(peer, ours) == 2.0
    assert peer.median / ours.median == pytest.approx(1.2)
    assert harness.ratio(peer, ours) == "2x"
    # times of different measure calls (or of none) are not paired: the ratio of the medians
    other = harness.Timing.of([1.0, 3.0, 2.0, 5.0, 4.0], 9)
    assert harness.paired_ratio(other, ours) == pytest.approx(1.2)
    assert harness.paired_ratio(harness.Timing.of([3.0]), harness.Timing.of([1.5])) == 2.0


def test_measure_labels_its_timings_with_one_run():
    out = harness.measure({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=0)
    again = harness.measure({"a": lambda: None}, repeats=2, warmup=0)
    assert out["a"].run == out["b"].run != 0
    assert again["a"].run not in (0, out["a"].run)


def test_readme_markers_replaced_and_required():
    text = f"intro\n{run_all.START}\nold\n{run_all.END}\nrest\n"
    new = run_all.replace_between_markers(text, "new table")
    assert new == f"intro\n{run_all.START}\nnew table\n{run_all.END}\nrest\n"
    with pytest.raises(ValueError, match="markers"):
        run_all.replace_between_markers("no markers", "x")


def test_loglog_slope():
    ns = [1, 2, 4, 8]
    assert bench_tall.slope(ns, [3.0 * n for n in ns]) == pytest.approx(1.0)
    assert bench_tall.slope(ns, [n**2 for n in ns]) == pytest.approx(2.0)


def test_gpu_table_dry_run_writes_every_section(tmp_path):
    # the GPU table runs where there is no GPU as a dry run at small sizes: every section is
    # written, dtriv's maps run in both dtypes, and a peer that fails is a cell, not a crash
    bench_gpu = _load("bench_gpu")
    out = tmp_path / "gpu.md"
    bench_gpu.main(["--device", "cpu", "--quick", "--dtypes", "float32", "bfloat16",
                    "--repeats", "1", "--warmup", "0", "--markdown", str(out)])
    text = out.read_text(encoding="utf-8")
    for dtype in ("float32", "bfloat16"):
        for title in ("orthogonal maps", "polar retraction, Newton-Schulz against SVD",
                      "sphere parametrization"):
            assert f"{title}, {dtype}" in text
    assert "RiemannianAdam step on Stiefel, float32" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    dtriv_cells = [r[2] for r in rows if r[1] in bench_gpu.MAPS]
    assert len(dtriv_cells) == 2 * 2 * len(bench_gpu.MAPS)  # two shapes, two dtypes
    assert not any(c.startswith("n/a") for c in dtriv_cells)

    def broken():
        raise NotImplementedError('"lu_cpu" not implemented for this dtype')

    ok, failed = bench_gpu._usable({"fine": lambda: None, "broken": broken})
    assert list(ok) == ["fine"]
    assert failed["broken"].startswith("n/a (NotImplementedError:")


def test_times_are_printed_in_the_unit_of_their_rounded_value():
    # 999.6 us rounds to 1000 us: it is "1 ms" (it printed "1e+03 µs")
    assert harness.fmt_seconds(999.6e-6) == "1 ms"
    assert harness.fmt_seconds(999.4e-6) == "999 µs"
    assert harness.fmt_seconds(0.9996) == "1 s"
    assert harness.fmt_seconds(12.34e-6) == "12.3 µs"


@pytest.mark.parametrize("argv", [["--quick", "--readme"], ["--only", "optim", "--readme"]])
def test_the_readme_table_comes_from_a_full_run_only(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_all.main(argv)
    assert exit_.value.code == 2
    assert "--readme: the README shows a full run" in capsys.readouterr().err


def test_a_value_beside_its_bound_is_printed_on_its_side():
    """A summary cell that rounds to its bound gets more digits (15.03 against <= 15 printed
    "15.0" beside "no")."""
    bench_orthogonal = _load("bench_orthogonal")
    assert bench_orthogonal._against(15.03, 15) == "15.03"
    assert bench_orthogonal._against(14.97, 15) == "14.97"
    assert bench_orthogonal._against(12.7, 15) == "12.7"
    assert bench_orthogonal._against(4.96, 5.0) == "4.96"
    assert bench_orthogonal._against(0.996, 1.0, 2) == "0.996"


@pytest.mark.parametrize("kind", ["dtriv-twin", "dtriv-constrain", "torch", "geotorch"])
def test_the_rnn_benchmark_maps_a_nonzero_generator(kind):
    """Registration leaves each implementation's generator at 0, where an exponential costs
    almost nothing: the RNN benchmark gives every constrained kernel the same parameter, the
    "small" regime of bench_orthogonal (|A|_1 = 1 for A = L - L^T), so the weight is not the
    identity-like point of registration."""
    import torch

    pytest.importorskip("geotorch")
    bench_rnn = _load("bench_rnn")
    bench_orthogonal = _load("bench_orthogonal")
    hidden = 12
    model = bench_rnn.build(kind, hidden)
    original = model.recurrent.parametrizations.weight.original
    torch.testing.assert_close(original.detach(),
                               bench_orthogonal._parameter(hidden, "matrix_exp", "small"))
    L = original.detach().tril()
    assert (L - L.mT).abs().sum(dim=-2).amax().item() == pytest.approx(1.0)
