"""Params through the CLI: every bad params file or override is exit 2 and one stderr line.

The classic bad inputs (anchor bomb, a run named ``../escaped``, ``runs:``
as a list, ``train.batch_per_process=0``, ``--set train.seed=1``) run through
``train`` and ``repro --dry``; ``repro`` validates exactly as ``train`` does.
Also: run names, the batch-split rule against the engine's own, overrides
a run would silently ignore, and error messages that quote at most about 100
characters of a value.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import yaml

from sim_core.cli import main
from sim_core.config import check_batch_split, check_run_name, load_params, read_yaml
from sim_core.engine.distributed import accumulation_steps
from sim_core.errors import InputError, quote

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "profiles" / "demo.yaml"

BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdef", "bcdefg")))


def _params_text(tmp_path: Path, edit=None, raw_prefix: str = "") -> Path:
    params = yaml.safe_load(DEMO.read_text())
    params["train"]["runs_dir"] = str(tmp_path / "runs")
    params["data"]["root"] = str(tmp_path / "no_data_yet")
    if edit:
        edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(raw_prefix + yaml.safe_dump(params, sort_keys=False))
    return path


def _one_line_exit_2(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, f"expected one line, got: {err[:2000]!r}"
    assert "Traceback" not in err and len(lines[0]) < 600, lines[0][:2000]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _rename_run(params: dict, old: str, new) -> None:
    params["runs"] = {(new if k == old else k): v for k, v in params["runs"].items()}


def _write_override(params: dict, override: str) -> None:
    key, value = override.split("=", 1)
    if key in ("train.seed", "train.method"):
        params["runs"]["sim_s0"]["set"] = {key: yaml.safe_load(value)}
    else:
        section, name = key.split(".")
        params[section][name] = yaml.safe_load(value)


# (case id, params edit, raw text put in front of the file, extra argv, run, needles)
TABLE = [
    ("anchor bomb", None, BOMB, [], "mask_s0", ["YAML anchor '&a' at line 1", "not allowed"]),
    ("alias in a value", None, "x: &x 0.01\n", [], "mask_s0", ["anchor '&x'"]),
    ("run named ../escaped", lambda p: _rename_run(p, "mask_s0", "../escaped"), "", [], "../escaped",
     ["run name '../escaped'", "letters, digits"]),
    ("runs given as a list", lambda p: p.update(runs=[{"method": "sim", "seed": 0}]), "", [], "mask_s0",
     ["'runs'", "mapping", "list"]),
    ("batch_per_process=0", None, "", ["--set", "train.batch_per_process=0"], "mask_s0",
     ["train.batch_per_process", "positive integer, got 0"]),
    ("batch_per_process splits unevenly", None, "", ["--set", "train.batch_per_process=3"], "mask_s0",
     ["train.batch_per_process", "equal micro-batches"]),
    ("batch not split over processes", None, "", ["--set", "train.processes=3"], "mask_s0",
     ["train.batch_size", "train.processes"]),
    ("seed override", None, "", ["--set", "train.seed=1"], "sim_s0", ["train.seed", "runs.sim_s0.seed"]),
    ("method override", None, "", ["--set", "train.method=mask"], "sim_s0", ["runs.sim_s0.method"]),
    ("seed in a run's set", lambda p: p["runs"]["sim_s0"].update({"set": {"train.seed": 3}}), "", [], "sim_s0",
     ["runs.sim_s0.set", "runs.sim_s0.seed"]),
    ("bad batch in a run's set", lambda p: p["runs"]["sim_s0"].update({"set": {"train.batch_per_process": 0}}),
     "", [], "sim_s0", ["runs.sim_s0.set", "train.batch_per_process"]),
    ("run name as a number", lambda p: _rename_run(p, "mask_s0", 7), "", [], "mask_s0", ["run name 7", "text"]),
    # found by the params fuzzing (tests/test_fuzz_cli.py): each crashed `train` with a traceback
    ("empty device", lambda p: p["train"].update(device=""), "", [], "mask_s0", ["train.device", "'cuda:N'"]),
    ("null device", lambda p: p["train"].update(device=None), "", [], "mask_s0", ["train.device", "None"]),
    ("null runs_dir", lambda p: p["train"].update(runs_dir=None), "", [], "mask_s0", ["train.runs_dir"]),
    ("missing runs_dir", lambda p: p["train"].pop("runs_dir"), "", [], "mask_s0", ["train.runs_dir"]),
    ("cpu_amp a word other than auto", lambda p: p["train"].update(cpu_amp="bf16"), "", [], "mask_s0",
     ["train.cpu_amp", "true, false or auto", "'bf16'"]),
    ("cpu_amp a number", None, "", ["--set", "train.cpu_amp=1"], "mask_s0", ["train.cpu_amp", "got 1"]),
]


@pytest.mark.parametrize("verb", ["train", "repro"])
@pytest.mark.parametrize("case, edit, raw, extra, run, needles", TABLE, ids=[row[0] for row in TABLE])
def test_bad_params_are_one_line_exit_2(capsys, tmp_path, monkeypatch, verb, case, edit, raw, extra, run,
                                        needles):
    monkeypatch.chdir(tmp_path)
    path = _params_text(tmp_path, edit, raw)
    if verb == "train":
        argv = ["train", "--run", run, "--params", str(path), *extra]
    else:
        if extra:  # repro has no --set: the same value goes into the file (a run's own key into its set:)
            path = _params_text(tmp_path, lambda p: _write_override(p, extra[1]), raw)
        argv = ["repro", "--dry", "--params", str(path)]
    started = time.monotonic()
    _one_line_exit_2(capsys, argv, *needles)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()


def test_anchor_bomb_is_refused_before_expansion(tmp_path):
    """Nine levels would exhaust memory if expanded; the loader stops at the first anchor, in milliseconds."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + "".join(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("gh", "hi"))
                    + "train: {lr: *i}\n")
    started = time.monotonic()
    with pytest.raises(InputError, match=r"bomb.yaml: YAML anchor '&a' at line 1"):
        read_yaml(path)
    assert time.monotonic() - started < 1.0


def test_alias_without_anchor_line_is_named(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  lr: 0.01\n  other: *nowhere\n")
    with pytest.raises(InputError) as info:
        read_yaml(path)
    assert "p.yaml" in str(info.value)  # an undefined alias: refused (as an alias, or as invalid YAML)


def test_alias_in_a_set_value_is_refused(capsys, tmp_path):
    path = _params_text(tmp_path)
    _one_line_exit_2(capsys, ["train", "--run", "mask_s0", "--params", str(path), "--set", "train.lr=&a 1"],
                     "--set", "anchor")


@pytest.mark.parametrize("name", ["sim_s0", "a.b-c_D9", "x" * 100, "0"])
def test_valid_run_names(name):
    check_run_name(name, "p")


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a..b", "../escaped", "a/b", "a\\b", "/abs", "x" * 101,
                                  "a b", "caf\u00e9", "run\n2", 3, None])
def test_invalid_run_names(name):
    with pytest.raises(InputError, match="run name"):
        check_run_name(name, "p")


def test_batch_rule_is_the_engines_rule():
    """check_batch_split refuses exactly what accumulation_steps would refuse mid-run (and nothing else)."""
    for batch_size, per, processes in itertools.product(range(1, 25), range(1, 13), range(1, 5)):
        try:
            accumulation_steps(batch_size, per, processes)
            engine_ok = True
        except InputError:
            engine_ok = False
        try:
            check_batch_split(batch_size, per, processes, "p")
            ours_ok = True
        except InputError:
            ours_ok = False
        assert ours_ok == engine_ok, (batch_size, per, processes)


@pytest.mark.parametrize("extra, needles", [
    (["--set", "sim.variant=released_code", "--set", "sim.tau=0.1"], ["sim.tau", "released_code"]),
    (["--set", "sim.pairwise_color_thresh=0.2", "--set", "boxinst.pairwise_color_thresh=0.1"],
     ["boxinst.pairwise_color_thresh", "sim.pairwise_color_thresh"]),
])
def test_overrides_a_sim_run_would_ignore_are_refused(capsys, tmp_path, extra, needles):
    path = _params_text(tmp_path)
    _one_line_exit_2(capsys, ["train", "--run", "sim_s0", "--params", str(path), *extra], *needles)


def test_overrides_that_take_effect_are_accepted(tmp_path):
    path = _params_text(tmp_path)
    # released_code's own value, and BoxInst's threshold for a BoxInst run: both honoured, so accepted
    load_params(path, ["sim.variant=released_code", "sim.tau=1.0"], run="sim_s0")
    load_params(path, ["boxinst.pairwise_color_thresh=0.1"], run="boxinst_s0")
    load_params(path, ["boxinst.pairwise_color_thresh=0.1"], run="sim_s0")  # sim's is null: BoxInst's is used


def test_seed_override_without_a_run_is_refused(capsys, tmp_path):
    path = _params_text(tmp_path)
    _one_line_exit_2(capsys, ["report", "--params", str(path), "--set", "train.seed=1"], "runs.<name>.seed")


def test_evaluate_refuses_an_ignored_override(capsys, tmp_path):
    path = _params_text(tmp_path)
    _one_line_exit_2(capsys, ["evaluate", "--run", "sim_s0", "--params", str(path), "--set", "train.seed=2"],
                     "runs.sim_s0.seed")


def test_messages_quote_at_most_about_100_characters(capsys, tmp_path):
    path = _params_text(tmp_path)
    line = _one_line_exit_2(capsys, ["train", "--run", "mask_s0", "--params", str(path),
                                     "--set", "train.lr=" + "x" * 100_000], "train.lr", "\u2026")
    assert len(line) < 250
    line = _one_line_exit_2(capsys, ["train", "--run", "mask_s0", "--params", str(path),
                                     "--set", "y" * 5000 + "=1"], "unknown params key", "\u2026")
    assert len(line) < 250


def test_quote_is_bounded_for_huge_values():
    huge = [[["lol"] * 1000] * 1000] * 1000  # 10^9 leaves: formatting it whole would never finish
    started = time.monotonic()
    text = quote(huge)
    assert len(text) <= 100 and text.endswith("\u2026") and time.monotonic() - started < 0.5
    assert quote("short") == "'short'"
    assert len(str(InputError("f", "z" * 10_000))) <= 1000


def test_repro_validates_like_train(capsys, tmp_path):
    """A bad value repro used not to look at (it only read the file) now stops it before any dvc command."""
    path = _params_text(tmp_path, lambda p: p["train"].update(lr=-1))
    _one_line_exit_2(capsys, ["repro", "--dry", "--params", str(path)], "train.lr", "positive")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("override, expected", [
    ("train.norm_weight_decay=[1,2]", "'train.norm_weight_decay' must be a number or null, got list"),
    ("boxinst.pairwise_warmup_iters=abc", "'boxinst.pairwise_warmup_iters' must be a number or null, got string"),
    ("sim.pairwise_color_thresh=true", "'sim.pairwise_color_thresh' must be a number or null, got bool"),
    ("train.steps=[a,1]", "'train.steps' must be a list of numbers"),
    ("data.train_sizes=[[64]]", "'data.train_sizes' must be a list of numbers"),
])
def test_every_key_is_type_checked_at_the_gate(tmp_path, capsys, override, expected):
    path = _params_text(tmp_path)
    assert main(["train", "--run", "mask_s0", "--params", str(path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_every_null_default_declares_its_kind():
    from sim_core.config import NULLABLE_KINDS

    def nulls(node: dict, prefix: str = "") -> set[str]:
        out = set()
        for key, value in node.items():
            if isinstance(value, dict) and f"{prefix}{key}" not in ("runs", "upstream_runs"):
                out |= nulls(value, f"{prefix}{key}.")
            elif value is None:
                out.add(f"{prefix}{key}")
        return out

    assert nulls(read_yaml(DEMO)) == set(NULLABLE_KINDS)
    load_params(DEMO, ["train.norm_weight_decay=0.0", "boxinst.pairwise_warmup_iters=null"])  # still accepted


@pytest.mark.parametrize("args, expected", [
    (["train", "--run", "mask_s0", "--set", "sim.alhpa=0.3"], "--set: unknown params key 'sim.alhpa' (did you "
                                                             "mean 'sim.alpha'?)"),
    (["train", "--run", "mask_s0", "--set", "trian.lr=0.3"], "(did you mean 'train.lr'?)"),
    (["profile", "demmo"], "unknown profile 'demmo' (did you mean 'demo'?)"),
    (["train", "--run", "mask_s0"], "prepared data not found; make it with: simbench prepare synthetic"),
])
def test_mistakes_get_a_suggestion(tmp_path, capsys, args, expected):
    path = _params_text(tmp_path)
    assert main([*args, "--params", str(path)] if args[0] != "profile" else
                [*args, "--params", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_yaml12_numbers_in_set(tmp_path):
    params = load_params(_params_text(tmp_path), ["train.max_iter=1e3", "train.lr=2E-4", "train.warmup_iters=2_0"])
    assert params["train"]["max_iter"] == 1000 and isinstance(params["train"]["max_iter"], int)
    assert params["train"]["lr"] == 2e-4 and params["train"]["warmup_iters"] == 20
    with pytest.raises(InputError, match="train.max_iter' must be a positive integer"):
        load_params(_params_text(tmp_path), ["train.max_iter=2.5e0"])


def test_version_and_profile_list(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("simbench ")
    assert main(["profile", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("demo ") and "synthetic data" in line for line in lines)
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # every profile has its description


def test_every_option_has_help():
    import argparse

    from sim_core.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)) and not action.help:
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")

    walk(build_parser(), ["simbench"])
    assert not missing, missing


def test_the_readme_synopsis_matches_the_parsers():
    """Every option the README's command-line synopsis shows exists in that verb's parser, and every verb is
    in the synopsis."""
    import argparse
    import re

    from sim_core.cli import VERBS, build_parser

    text = (REPO / "README.md").read_text()
    synopsis = text.split("## Command line", 1)[1].split("```", 2)[1]
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen = set()
    for line in synopsis.strip().splitlines():
        words = line.split()
        verb = words[1]
        seen.add(verb)
        parser = subparsers.choices[verb]
        if len(words) > 2 and words[2] in getattr(next((a for a in parser._actions if isinstance(
                a, argparse._SubParsersAction)), None), "choices", {}):
            parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[words[2]]
        known = {o for a in parser._actions for o in a.option_strings}
        for option in re.findall(r"(--[a-z][a-z-]*)", line.split("(docs/")[0]):
            assert option in known, f"README synopsis: {verb} has no option {option}"
    assert seen == set(VERBS), sorted(set(VERBS) ^ seen)
