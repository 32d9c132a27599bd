"""Config validation (errors name file, key and allowed values) and sweep expansion."""

from __future__ import annotations

import json
import math
import shlex

import pytest

from experiments.backend import make_manifold
from experiments.cli import demo_config_path, main
from experiments.config import ConfigError, expand_sweep, load_config, parse_override
from experiments.sweep import commands


def test_defaults_are_filled(write_config):
    path = write_config(optim={"K": "inf"})
    run = load_config(path)
    cfg = run.config
    assert cfg["optim"]["K"] == math.inf
    assert cfg["model"]["manifold"] == "orthogonal" and cfg["optim"]["state"] == "keep"
    assert cfg["train"]["device"] == "cpu" and cfg["task"]["length"] == 5
    assert run.name == "seed=3" and cfg["run"]["group"] == "default"
    assert run.directory == path.parent / "results" / "tiny" / "seed=3"


def test_name_defaults_to_file_name(write_config, tmp_path):
    base = {k: v for k, v in load_config(write_config()).config.items()
            if k in ("task", "model", "optim", "train")}
    path = write_config("my-experiment.toml", base=base)
    assert load_config(path).config["name"] == "my-experiment"
    # a file name that is no folder name is reduced to one, as run labels are
    path = write_config("my exp (v2).toml", base=base)
    assert load_config(path).config["name"] == "my_exp_v2_"
    assert expand_sweep(path)[0].directory.parent == tmp_path / "results" / "my_exp_v2_"


@pytest.mark.parametrize("changes, pattern", [
    ({"model": {"hiden": 8}}, r"model\.hiden: expected a key of \[model\]: name, hidden"),
    ({"tarin": {"steps": 1}}, r"tarin: expected a top-level key or table among name, output, "
                              r"task, model, optim, train, sweep"),
    ({"task": {"name": "copy"}}, r"task\.name: expected one of 'copying', 'adding', 'digits', "
                                 r"'mnist', got 'copy'"),
    ({"train": {"steps": "many"}}, r"train\.steps: expected an integer >= 1, got 'many'"),
    ({"train": {"steps": 0}}, r"train\.steps: expected an integer >= 1, got 0"),
    ({"optim": {"lr": -1.0}}, r"optim\.lr: expected a number > 0, got -1\.0"),
    ({"optim": {"K": 0}}, r'optim\.K: expected an integer >= 1 or "inf"'),
    ({"train": {"device": "gpu"}}, r"train\.device: expected 'cpu', 'cuda'"),
    ({"task": {"permuted": True}}, r"task\.permuted: expected no value"),
    ({"optim": {"name": "riemannian_adam"}, "model": {"name": "lstm"}},
     r"optim\.name: expected rmsprop, adam or sgd"),
])
def test_errors_name_file_key_and_allowed(write_config, changes, pattern):
    path = write_config(**changes)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_retraction_error_lists_the_manifolds_retractions(write_config):
    path = write_config(model={"retraction": "housholder"})
    allowed = make_manifold("orthogonal", 8).retractions
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"{path}: model.retraction" in msg and "'housholder'" in msg
    assert f"({', '.join(allowed)})" in msg
    # an unconstrained model ignores the retraction, but a value outside the set still stops
    with pytest.raises(ConfigError, match=r"model\.retraction: expected a retraction"):
        load_config(write_config(model={"name": "rnn", "retraction": "bogus"}))


def test_mnist_needs_a_path(write_config):
    with pytest.raises(ConfigError, match=r"task\.path: .*t10k-images-idx3-ubyte"):
        load_config(write_config(task={"name": "mnist"}, base={
            k: v for k, v in load_config(write_config()).config.items()
            if k in ("model", "optim", "train")}))


def test_sweep_expansion(write_config):
    path = write_config(sweep={"model.retraction": ["expm", "cayley"], "K": [1, "inf"],
                               "train.seed": [0, 1]})
    runs = expand_sweep(path)
    assert len(runs) == 8
    names = [r.name for r in runs]
    assert names[:3] == ["retraction=expm_K=1_seed=0", "retraction=expm_K=1_seed=1",
                         "retraction=expm_K=inf_seed=0"]
    assert len(set(names)) == 8
    first = runs[0].config
    assert first["model"]["retraction"] == "expm" and first["optim"]["K"] == 1
    assert runs[-1].config["model"]["retraction"] == "cayley"
    assert runs[-1].config["optim"]["K"] == math.inf and runs[-1].config["train"]["seed"] == 1
    groups = {r.config["run"]["group"] for r in runs}
    assert groups == {"retraction=expm_K=1", "retraction=expm_K=inf",
                      "retraction=cayley_K=1", "retraction=cayley_K=inf"}
    # `run` ignores the sweep table; overrides pin a key for all runs of a sweep
    assert load_config(path).config["model"]["retraction"] == "expm"
    pinned = expand_sweep(path, ["optim.K=3"])
    assert len(pinned) == 4 and {r.config["optim"]["K"] for r in pinned} == {3}


def test_sweep_errors(write_config):
    with pytest.raises(ConfigError, match=r"sweep key 'retractoin' is unknown"):
        expand_sweep(write_config(sweep={"retractoin": ["expm"]}))
    with pytest.raises(ConfigError, match=r"sweep key 'name' is ambiguous"):
        expand_sweep(write_config(sweep={"name": ["lstm"]}))
    with pytest.raises(ConfigError, match=r"sweep\.K: expected a non-empty list"):
        expand_sweep(write_config(sweep={"K": 3}))
    with pytest.raises(ConfigError,
                       match=r"model\.retraction: .*'nope'.*sweep combination"):
        expand_sweep(write_config(sweep={"model.retraction": ["expm", "nope"]}))


def test_print_commands_reproduce_the_sweep(write_config, capsys):
    path = write_config(sweep={"model.retraction": ["expm", "cayley"], "optim.K": [1, "inf"]})
    runs = expand_sweep(path)
    lines = commands(runs, str(path))
    assert len(lines) == 4
    for line, run in zip(lines, runs):
        argv = shlex.split(line)
        assert argv[1:5] == ["-m", "experiments", "run", str(path)]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        again = load_config(path, sets)
        assert again.config == run.config and again.directory == run.directory
    assert main(["sweep", str(path), "--print-commands"]) == 0
    assert capsys.readouterr().out.splitlines() == lines


def test_print_commands_quote_strings_that_would_read_as_other_values(write_config):
    """A swept string that reads as another TOML value (a folder named ``2024`` or ``true``,
    ``inf``, a date) or holds quotes is printed as a quoted TOML string, so that the command
    reads it back as that string; plain strings stay unquoted."""
    plain = load_config(write_config())
    base = {k: v for k, v in plain.config.items() if k in ("model", "optim", "train")}
    values = ["2024", "true", "inf", "1979-05-27", 'data "q" dir', "data/mnist", "a b"]
    path = write_config("pixels.toml", base=base, task={"name": "mnist", "path": "x"},
                        sweep={"task.path": values})
    runs = expand_sweep(path)
    lines = commands(runs, str(path))
    for line, run, value in zip(lines, runs, values):
        argv = shlex.split(line)
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        assert f"task.path={value}" in sets or f"task.path={json.dumps(value)}" in sets
        again = load_config(path, sets)
        assert again.config["task"]["path"] == value
        assert again.config == run.config and again.directory == run.directory
    assert "--set task.path=data/mnist" in lines[values.index("data/mnist")]


@pytest.mark.parametrize("jobs", ["0", "-2", "two"])
@pytest.mark.parametrize("command", ["sweep", "demo"])
def test_jobs_must_be_a_positive_integer(write_config, capsys, jobs, command):
    args = [command, str(write_config())] if command == "sweep" else [command]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--jobs", jobs, "--print-commands"] if command == "sweep"
             else [*args, "--jobs", jobs])
    assert exit_info.value.code == 2
    assert f"argument --jobs: expected a positive integer, got '{jobs}'" in (
        capsys.readouterr().err)



    assert parse_override("optim.K=10") == ("optim.K", 10)
    assert parse_override("retraction=cayley") == ("model.retraction", "cayley")
    assert parse_override("task.permuted=true") == ("task.permuted", True)
    assert parse_override("lr=3e-4") == ("optim.lr", 3e-4)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("K")


def test_cli_reports_config_errors(write_config, capsys):
    path = write_config(model={"hiden": 8})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.hiden" in err and str(path) in err


def test_shipped_configs_are_valid():
    folder = demo_config_path().parent
    names = sorted(p.name for p in folder.glob("*.toml"))
    assert {"demo.toml", "copying.toml", "adding.toml", "digits.toml", "mnist.toml"} <= set(names)
    for p in folder.glob("*.toml"):
        assert expand_sweep(p)
    demo = expand_sweep(demo_config_path())
    assert len({r.config["model"]["retraction"] for r in demo}) == 2
    assert len({r.config["optim"]["K"] for r in demo}) == 2


def test_run_names_leave_out_execution_keys(write_config):
    path = write_config()
    run = load_config(path, ["train.threads=2", "train.device=cpu", "optim.lr=0.5",
                             "train.log_every=1"])
    assert run.name == "lr=0.5_seed=3" and run.config["train"]["threads"] == 2


@pytest.mark.parametrize("changes, pattern", [
    ({"optim": {"alpha": 1.0}}, r"optim\.alpha: expected a number in \[0, 1\), got 1\.0"),
    ({"optim": {"alpha": -0.5}}, r"optim\.alpha: expected a number in \[0, 1\), got -0\.5"),
    ({"optim": {"momentum": 1.0}}, r"optim\.momentum: expected a number in \[0, 1\), got 1\.0"),
    ({"name": ".."}, r"name: expected a non-empty name .*\(not '\.' or '\.\.'\), got '\.\.'"),
    ({"name": "."}, r"name: expected .*got '\.'"),
])
def test_ranges_and_folder_names(write_config, changes, pattern):
    base = {k: v for k, v in load_config(write_config()).config.items()
            if k in ("task", "model", "optim", "train")}
    path = write_config(base={**base, **changes})
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)


def test_alpha_zero_is_allowed(write_config):
    assert load_config(write_config(optim={"alpha": 0.0})).config["optim"]["alpha"] == 0.0


def test_set_errors_name_set_not_the_file(write_config):
    path = write_config()
    with pytest.raises(ConfigError) as info:
        load_config(path, ["optim.lr=-1"])
    assert str(info.value) == "--set: optim.lr: expected a number > 0, got -1"
    with pytest.raises(ConfigError, match=r"^\S+tiny\.toml with --set model\.retraction=nope: "
                                          r"model\.retraction: expected a retraction"):
        load_config(path, ["model.retraction=nope"])
    with pytest.raises(ConfigError, match=r"with --set optim\.K=0|--set: optim\.K"):
        expand_sweep(write_config(sweep={"model.retraction": ["expm"]}), ["optim.K=0"])


def test_set_key_errors_say_set(write_config):
    path = write_config()
    with pytest.raises(ConfigError, match=r"^--set: --set key 'name' is ambiguous"):
        load_config(path, ["name=x"])
    with pytest.raises(ConfigError, match=r"^--set: --set key 'retractoin' is unknown"):
        load_config(path, ["retractoin=expm"])


def test_equal_values_name_one_folder(write_config):
    # "Inf" (read as a string) and inf (a TOML float) are one value of optim.K: one run
    path = write_config()
    assert load_config(path, ["optim.K=Inf"]).directory == (
        load_config(path, ["optim.K=inf"]).directory)
    assert load_config(path, ["optim.K=inf"]).name == "K=inf_seed=3"


def test_run_labels_are_one_folder(write_config, tmp_path):
    base = {k: v for k, v in load_config(write_config()).config.items()
            if k in ("model", "optim", "train")}
    path = write_config(base=base, task={"name": "mnist", "path": "/x"},
                        sweep={"task.path": ["/data/../mnist", "/y"]})
    run = expand_sweep(path)[0]
    assert run.name == "path=_data_.._mnist_seed=3"
    assert run.directory.parent == tmp_path / "results" / "tiny"
    assert load_config(path, ["task.path=/data/../mnist"]).directory == run.directory


def test_set_of_a_resumable_key_keeps_the_run_name(write_config):
    # --resume --set train.steps=N extends the run in its folder; the data may move
    path = write_config(sweep={"optim.K": [1, 7], "train.seed": [0, 1]})
    plain = load_config(path)
    for pairs in (["train.steps=500"],
                  ["train.steps=500", "train.threads=2", "train.checkpoint_every=3",
                   "train.eval_batch=7", "train.device=cpu"]):
        run = load_config(path, pairs)
        assert run.name == plain.name == "seed=3" and run.directory == plain.directory
        assert run.config["run"]["group"] == "default"
    assert load_config(path, ["train.steps=500"]).config["train"]["steps"] == 500
    assert load_config(path, ["optim.lr=0.5"]).name == "lr=0.5_seed=3"  # not resumable
    names = [r.name for r in expand_sweep(path)]
    extended = expand_sweep(path, ["train.steps=500"])
    assert [r.name for r in extended] == names == ["K=1_seed=0", "K=1_seed=1", "K=7_seed=0",
                                                   "K=7_seed=1"]
    assert {r.config["train"]["steps"] for r in extended} == {500}
    base = {k: v for k, v in plain.config.items() if k in ("model", "optim", "train")}
    pixels = write_config("pixels.toml", base=base, task={"name": "digits", "path": "/a"})
    assert load_config(pixels, ["task.path=/b/moved"]).name == "seed=3"


def test_a_sweep_over_steps_names_its_runs(write_config, capsys):
    # a swept resumable key is what tells the runs apart: it stays in their names, also in
    # the `run` commands that reproduce them, and repeated values still collide
    path = write_config(sweep={"train.steps": [10, 20], "train.seed": [0]})
    runs = expand_sweep(path)
    assert [r.name for r in runs] == ["steps=10_seed=0", "steps=20_seed=0"]
    assert [r.config["run"]["group"] for r in runs] == ["steps=10", "steps=20"]
    for line, run in zip(commands(runs, str(path)), runs):
        argv = shlex.split(line)
        again = load_config(path, [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
        assert again.config == run.config and again.directory == run.directory
    assert [r.name for r in expand_sweep(path, ["train.steps=30"])] == ["steps=30_seed=0"]
    with pytest.raises(ConfigError, match=r"distinct run names .*got 1 repeated: "
                                          r"steps=10_seed=3"):
        expand_sweep(write_config(sweep={"train.steps": [10, 10]}))
    with pytest.raises(ConfigError, match=r"distinct run names .*got 1 repeated: seed=3.*"
                                          r"train\.threads"):
        expand_sweep(write_config(sweep={"train.threads": [1, 2]}))


def test_a_sweep_whose_runs_share_a_folder_names_them(write_config):
    # repeated values (or values equal once sanitized for a folder name) would share a run
    path = write_config(sweep={"optim.K": [1, 1]})
    with pytest.raises(ConfigError, match=r"\[sweep\]: expected combinations with distinct run "
                                          r"names .*got 1 repeated: K=1_seed=3"):
        expand_sweep(path)
