"""The search space without a Ray cluster: distributions and their refusals, what each
search algorithm takes, trial names, Tune's own searchers driven as Tune drives them
(bounds, distinct draws, the same draws for the same seed, the Optuna study restored), the
values the rest of the code asks for, the rule that no other module lays out the grid, and
the analysis of a sampled experiment (typed columns, PED-ANOVA, plots). The sweeps through
Ray are in test_search_sweeps.py."""

from __future__ import annotations

import ast
import copy
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from sweeper import search
from sweeper.experiment import SUPERSEDED, plan_experiment, supersede_lost, trial_names
from sweeper.preflight import preflight
from sweeper.run import main
from sweeper.sink import TrialSink
from sweeper.spec import MAX_TRIALS, SpecError, spec_fingerprint, validate
from sweeper.storage import resolve
from sweeper.trials import resolve_trial, sweep_models, trial_configs
from tests.conftest import base_doc, table_after

ROOT = Path(__file__).resolve().parents[1]
LR = {"loguniform": [1.0e-5, 1.0e-2]}
WD = {"uniform": [0.0, 0.1]}


def sampled_doc(tmp_path: Path, algorithm: str = "optuna", samples: int = 4,
                **grid: Any) -> dict:
    doc = base_doc(tmp_path)
    doc["grid"].update({"train.lr": LR, "train.weight_decay": WD, **grid})
    doc["tune"] = {"search": algorithm, "num_samples": samples}
    return doc


def refusal(doc: dict) -> str:
    with pytest.raises(SpecError) as e:
        validate(doc)
    assert "\n" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(("axis", "value", "expected"), [
    ("train.lr", {"loguniform": [0.0, 1.0]}, "grid.train.lr: loguniform: lo must be > 0"),
    ("train.lr", {"uniform": [1.0, 1.0]}, "grid.train.lr: uniform: lo 1.0 must be below hi"),
    ("train.lr", {"uniform": [-1.0, 1.0]},
     "grid.train.lr: uniform(-1, 1) draws -1: train.lr: Input should be greater than 0"),
    ("train.lr", {"uniform": [1, True]}, "grid.train.lr: uniform hi must be a number"),
    ("train.lr", {"uniform": [1.0, 2.0, 3.0]}, "grid.train.lr: uniform: expected [lo, hi]"),
    ("train.lr", {"normal": [0, 1]}, "grid.train.lr: a distribution is one key of"),
    ("train.lr", {"uniform": [0.1, 0.2], "choice": [1]}, "grid.train.lr: a distribution is"),
    ("train.lr", {"quniform": [0.0, 1.0, 2.0]}, "grid.train.lr: quniform: q must be > 0"),
    ("train.warmup_steps", {"randint": [0, 2.5]}, "grid.train.warmup_steps: randint hi must "
                                                  "be a whole number"),
    ("train.warmup_steps", {"uniform": [0, 10]}, "grid.train.warmup_steps: uniform(0, 10) "
                                                 "draws 3.82: train.warmup_steps: Input should "
                                                 "be a valid integer"),
    ("train.schedule", {"choice": ["cosine", "linear"]},
     "grid.train.schedule.choice[1]: train.schedule: Input should be"),
    ("train.lr", {"choice": [1e-4, 1e-4]}, "grid.train.lr: choice: 0.0001 is listed twice"),
    ("train.lr", {"choice": []}, "grid.train.lr: choice: needs at least one value"),
    ("model.tiny.hidden_size", {"randint": [8, 10_000_000]},
     "grid.model.tiny.hidden_size: randint(8, 10000000) is drawn from a range; a model axis"),
    ("batch_size", {"uniform": [8.0, 64.0]},
     "grid.batch_size: uniform(8, 64) draws 29.392, which this axis does not take"),
    ("batch_size", {"randint": [0, 4]}, "grid.batch_size: randint(0, 4) draws 0; must be >= 1"),
    ("variant", {"choice": ["siglip", "clip"]},
     "grid.variant.choice[1]: variant 'clip' is not defined"),
    ("n_train_classes", {"randint": [2, 20]},
     "grid.n_train_classes.randint: 9 exceeds the dataset's 8 classes"),
])
def test_distributions_are_validated_naming_the_key(tmp_path: Path, axis: str, value: Any,
                                                    expected: str) -> None:
    doc = sampled_doc(tmp_path, "random")
    doc["grid"][axis] = value
    assert refusal(doc).startswith(expected)


def test_distributions_round_trip_and_take_the_axis_type(tmp_path: Path) -> None:
    doc = sampled_doc(tmp_path, "random", batch_size={"randint": [8, 33]},
                      **{"train.schedule": {"choice": ["constant", "cosine"]}})
    doc["scaling"]["num_workers"] = 1
    spec = validate(doc)
    assert spec.grid.batch_size == search.Distribution("randint", (8, 33))
    dumped = spec.model_dump(mode="json")["grid"]
    assert dumped["batch_size"] == {"randint": [8, 33]} and dumped["train.lr"] == LR
    assert validate({**doc, "grid": dumped}) == spec  # what sweep.json keeps, reloaded
    assert search.values(spec, "batch_size") == list(range(8, 33))
    assert search.values(spec, "train.lr") is None  # a real range: not listed
    assert search.values(spec, "train.schedule") == ["constant", "cosine"]
    assert search.varying(spec) == ["batch_size", "train.lr", "train.weight_decay",
                                    "train.schedule"]
    # Workers split every batch size the range holds: 2 workers refuse the odd ones.
    doc["scaling"]["num_workers"] = 2
    assert refusal(doc) == "grid.batch_size.randint: 9 must be divisible by " \
                           "scaling.num_workers=2"


def test_each_algorithm_says_what_it_cannot_take(tmp_path: Path) -> None:
    grid_doc = sampled_doc(tmp_path, "grid", 1)
    assert refusal(grid_doc).startswith(
        "grid.train.lr: loguniform(1e-05, 0.01) is a distribution, which tune.search: grid "
        "cannot sample")
    plain = base_doc(tmp_path, tune={"num_samples": 3})
    assert refusal(plain).startswith("tune.num_samples: 3 samples, but tune.search: grid runs "
                                     "each grid point once")
    optuna = sampled_doc(tmp_path, "optuna", variant=["siglip", "siglit"])
    assert refusal(optuna).startswith(
        'grid.variant: tune.search: optuna cannot cross a grid axis (2 values) with its '
        'samples; write {choice: ["siglip", "siglit"]} to let it choose')
    only_lists = base_doc(tmp_path, tune={"search": "optuna", "num_samples": 4})
    assert refusal(only_lists).startswith("tune.search: optuna needs a distribution in grid")
    # Random search crosses grid axes with its draws; the trials are counted up front.
    crossed = sampled_doc(tmp_path, "random", 3, variant=["siglip", "siglit"],
                          seed=[0, 1])
    assert search.n_trials(validate(crossed)) == 12
    big = sampled_doc(tmp_path, "random", MAX_TRIALS, variant=["siglip", "siglit"])
    assert refusal(big).startswith(f"grid: {2 * MAX_TRIALS} trials (2 variant x "
                                   f"{MAX_TRIALS} samples) exceed the limit")
    assert validate({**plain, "tune": {"search": "random", "num_samples": 2}})


def test_a_missing_optuna_is_refused_in_one_line_naming_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna" else real(name, *a))
    doc = sampled_doc(tmp_path)
    with pytest.raises(SpecError) as e:
        preflight(validate(doc))
    assert str(e.value) == ("tune.search: optuna needs the 'optuna' package, which is not "
                            'installed: pip install -e ".[optuna]" (or pip install optuna)')
    spec = tmp_path / "s.yaml"
    spec.write_text(json.dumps(doc))
    assert main([str(spec), "--dry-run"]) == 2  # what a run refuses, a dry run refuses
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {e.value}"]
    assert not (tmp_path / "results").exists()


def test_dry_run_of_a_sampling_search_says_what_it_draws(capsys: pytest.CaptureFixture) -> None:
    assert main([str(ROOT / "search_spaces" / "lr_search.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tune.search: optuna, 16 trials (16 samples), seed 0" in out
    assert "train.lr: loguniform(1e-05, 0.003)" in out
    assert "variant: choice('siglip', 'siglit')" in out


def test_an_experiment_of_an_older_sweeper_resumes(tmp_path: Path) -> None:
    """Specs written before `tune.search` existed compute the same trials: the experiment
    reopens (the new keys at their defaults are no change) and the trial names are those
    of the grid."""
    spec = validate(base_doc(tmp_path))
    exp = tmp_path / "results" / "t"
    exp.mkdir(parents=True)
    old = spec.model_dump(mode="json")
    for key in ("search", "num_samples", "search_seed"):
        del old["tune"][key]
    (exp / "sweep.json").write_text(json.dumps({"fingerprint": "from-an-older-sweeper",
                                                "spec": old}))
    assert plan_experiment(spec).name == "t"
    assert [t.trial_id for t in trial_configs(spec)] == ["siglip-templates-bs16-k4-s0"]
    assert spec_fingerprint(spec) != "from-an-older-sweeper"


# --------------------------------------------------------------------------- names, Tune


def test_trial_names(tmp_path: Path) -> None:
    point = {"variant": "siglip", "text_source": "templates", "batch_size": 16,
             "n_train_classes": 4, "seed": 0, "train.lr": 3.14159265e-4}
    assert search.trial_name(point) == "siglip-templates-bs16-k4-s0-lr0.000314159"
    # Two proposals of the same values are two trials: the searcher's index tells them apart.
    assert search.trial_name(point, 3) != search.trial_name(point, 4)
    assert search.trial_name(point, 12).endswith("-lr0.000314159-n12")
    assert search.proposal_index(search.trial_name(point, 12)) == 12
    assert search.proposal_index(search.trial_name(point)) is None
    long = {**point, **{f"train.{k}": 1.0 for k in ("lr_text", "lr_vision", "lr_logit",
                                                     "weight_decay", "max_grad_norm")}}
    assert search.proposal_index(search.trial_name(long, 7)) == 7
    spec = validate(sampled_doc(tmp_path))
    config = {**point, "train.lr": 1e-4, "train.weight_decay": 0.05}
    # Tune's experiment tag starts with the searcher's index.
    assert search.tune_trial_name(spec, config, "7_train.lr=0.0001,train.weight_decay=0.05") \
        == "siglip-templates-bs16-k4-s0-lr0.0001-weight_decay0.05-n7"
    grid = validate(base_doc(tmp_path))
    assert search.tune_trial_name(grid, config, "0_x") == "siglip-templates-bs16-k4-s0"


def test_param_space_is_tunes(tmp_path: Path) -> None:
    from ray import tune
    from ray.tune.search.sample import Categorical, Float

    grid = search.param_space(validate(base_doc(tmp_path)))
    assert grid["variant"] == tune.grid_search(["siglip"])
    space = search.param_space(validate(sampled_doc(
        tmp_path, variant={"choice": ["siglip", "siglit"]})))
    assert space["batch_size"] == 16  # Optuna takes no grid axis: one value is a constant
    assert isinstance(space["variant"], Categorical)
    lr = space["train.lr"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-5, 1e-2)
    assert "LogUniform" in type(lr.get_sampler()).__name__


def propose(spec: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every trial the spec's search algorithm proposes, driven as Tune drives it (each
    proposal completed at once), as (trial name, point)."""
    from ray import tune
    from ray.tune.search import Searcher, SearchGenerator

    alg = search.search_algorithm(spec, 2)
    if isinstance(alg, Searcher):
        alg = SearchGenerator(alg)
    space = search.param_space(spec)
    alg.set_search_properties(None, None, space)
    alg.add_configurations([tune.Experiment("x", run=lambda config: None, config=space,
                                            num_samples=search.num_samples(spec))])
    out = []
    while (trial := alg.next_trial()) is not None:
        out.append((search.tune_trial_name(spec, trial.config, trial.experiment_tag),
                    search.point_of(spec, trial.config)))
        # A result that only the learning rate moves, the same at every call.
        top1 = 1 - abs(math.log10(trial.config["train.lr"]) + 3) / 10
        alg.on_trial_complete(trial.trial_id, result={"val_top1": top1,
                                                      "training_iteration": 1})
    return out


@pytest.mark.parametrize("algorithm", ["random", "optuna"])
def test_searchers_draw_inside_bounds_distinct_and_reproducibly(tmp_path: Path,
                                                                algorithm: str) -> None:
    doc = sampled_doc(tmp_path, algorithm, 12)
    trials = propose(validate(doc))
    assert len(trials) == 12 and len({name for name, _ in trials}) == 12
    lrs = [p["train.lr"] for _, p in trials]
    wds = [p["train.weight_decay"] for _, p in trials]
    assert all(1e-5 <= v <= 1e-2 for v in lrs) and all(0 <= v <= 0.1 for v in wds)
    assert len(set(lrs)) == 12 and len(set(wds)) == 12
    # Log-uniform: about as many draws below the geometric middle (3.2e-4) as above.
    assert 2 <= sum(v < math.sqrt(1e-5 * 1e-2) for v in lrs) <= 10
    assert propose(validate(doc)) == trials  # the same seed, the same trials
    doc["tune"]["search_seed"] = 1
    assert {n for n, _ in propose(validate(doc))}.isdisjoint({n for n, _ in trials})


def test_random_search_crosses_grid_axes_with_its_draws(tmp_path: Path) -> None:
    doc = sampled_doc(tmp_path, "random", 3, variant=["siglip", "siglit"])
    trials = propose(validate(doc))
    assert [p["variant"] for _, p in trials] == ["siglip", "siglit"] * 3
    assert [search.proposal_index(n) for n, _ in trials] == list(range(6))


def test_the_optuna_study_is_restored_from_tunes_saved_state(tmp_path: Path) -> None:
    """What `Tuner.restore` does with the searcher: Tune saves the search algorithm with the
    experiment state and restores it into the next run's; the proposals go on where they
    stopped, and no more than num_samples are made."""
    from ray.tune import Experiment
    from ray.tune.search import SearchGenerator

    spec = validate(sampled_doc(tmp_path, "optuna", 6))
    whole = propose(spec)
    space = search.param_space(spec)

    def generator() -> Any:
        alg = SearchGenerator(search.search_algorithm(spec, 2))
        alg.set_search_properties(None, None, space)
        return alg

    first = generator()
    first.add_configurations([Experiment("x", run=lambda config: None, config=space,
                                         num_samples=6)])
    names = []
    for _ in range(4):
        t = first.next_trial()
        names.append(search.tune_trial_name(spec, t.config, t.experiment_tag))
        first.on_trial_complete(t.trial_id, result={"val_top1": 0.5, "training_iteration": 1})
    state = tmp_path / "state"
    state.mkdir()
    first.save_to_dir(str(state), session_str="s")
    again = generator()  # a new run's search algorithm, restored as Tune restores it
    again.restore_from_dir(str(state))
    while (t := again.next_trial()) is not None:
        names.append(search.tune_trial_name(spec, t.config, t.experiment_tag))
        again.on_trial_complete(t.trial_id, result={"val_top1": 0.5, "training_iteration": 1})
    assert names == [n for n, _ in whole]


# --------------------------------------------------------------------------- asking


def test_values_are_asked_for_not_laid_out(tmp_path: Path) -> None:
    """A grid of 2 x 10 x 5 x 50 trials x a model axis: the models are found from the 2 x 2
    combinations of the axes they depend on, not from the 10,000 trials."""
    doc = base_doc(tmp_path)
    doc["grid"].update({"variant": ["siglip", "siglit"], "n_train_classes": [1, 2, 3, 4, 5, 6,
                                                                                 7, 8],
                        "seed": list(range(50)), "train.lr": [1e-4, 2e-4, 3e-4, 4e-4, 5e-4],
                        "model.tiny.hidden_size": [32, 64]})
    doc["variants"]["siglit"]["model"] = {"tiny": {"hidden_size": 32, "num_layers": 2}}
    spec = validate(doc)
    assert search.n_trials(spec) == 2 * 8 * 50 * 5 * 2
    points = search.covering_points(spec, lambda k: k == "variant" or k.startswith("model."))
    assert len(points) == 4
    assert sorted((m.tiny.hidden_size, m.tiny.num_layers) for m in sweep_models(spec)) == [
        (32, 1), (32, 2), (64, 1), (64, 2)]
    assert search.values(spec, "n_train_classes") == [1, 2, 3, 4, 5, 6, 7, 8]
    # Of a sampling search too: its model axis is a choice, listed.
    doc["grid"]["model.tiny.hidden_size"] = {"choice": [32, 64]}
    doc["grid"]["train.lr"] = LR
    doc["tune"] = {"search": "random", "num_samples": 4}
    assert len(sweep_models(validate(doc))) == 4


_ENUMERATORS = {"points", "grid_points", "covering_points", "trial_configs", "product"}
# Who may lay out trials: the search module (its own), the resolver of trial configs, and
# what needs the trials known up front by name: sweep.json's list, the end-of-sweep
# statuses (experiment) and the dry-run table (run).
_MAY = {
    "sweeper/search.py": _ENUMERATORS,
    "sweeper/trials.py": {"points", "covering_points"},
    "sweeper/experiment.py": {"points", "trial_configs"},
    "sweeper/run.py": {"trial_configs"},
}


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute)
                      else "")
        elif isinstance(node, ast.ImportFrom) and node.module == "itertools":
            names.update(a.name for a in node.names)
    return names


def test_only_the_search_module_lays_out_the_grid() -> None:
    """No module outside sweeper/search.py expands the grid itself (itertools.product), and
    only the modules that need every trial by name ask for them; preflight, model
    preparation, the caches and the orchestration ask for values (`search.values`,
    `covering_points` through `trials.covering_configs`)."""
    offenders = {}
    for path in sorted([*(ROOT / "sweeper").rglob("*.py"), *(ROOT / "analysis").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        used = (_calls(path) & _ENUMERATORS) - _MAY.get(rel, set())
        if used:
            offenders[rel] = sorted(used)
    assert offenders == {}, offenders
    assert "product" in _calls(ROOT / "sweeper" / "search.py")  # the test sees calls


# --------------------------------------------------------------------------- experiment


def test_a_lost_proposal_is_superseded_not_counted(tmp_path: Path) -> None:
    """A trial proposed after Tune's last save of its state, then killed: the restored
    searcher proposes index 3 again, with other values (TPE saw other results). The old
    folder is marked superseded, kept, and left out of the trials and the tables."""
    spec = validate(sampled_doc(tmp_path))
    exp = resolve(tmp_path / "results" / "t")
    TrialSink.at(exp / "trials" / "a-n3").update_status(status="running")
    TrialSink.at(exp / "trials" / "b-n2").update_status(status="terminated")
    TrialSink.at(exp / "trials" / "c-n2").update_status(status="running")
    assert supersede_lost(exp, "d-n3") == ["a-n3"]
    assert supersede_lost(exp, "e-n2") == ["c-n2"]  # a finished trial is never superseded
    st = TrialSink.at(exp / "trials" / "a-n3").status()
    assert st["status"] == SUPERSEDED and st["superseded_by"] == "d-n3"
    TrialSink.at(exp / "trials" / "d-n3").update_status(status="running")
    assert trial_names(spec, exp) == ["b-n2", "d-n3"]
    from analysis.collect import read_experiment

    assert sorted(r.trial_id for r in read_experiment(exp.fs_path).trials) == ["b-n2", "d-n3"]


# --------------------------------------------------------------------------- analysis


def write_sampled_experiment(root: Path, n: int = 24, **grid: Any) -> Path:
    """An experiment directory of an Optuna sweep of `n` trials over a variant choice,
    `train.lr` and `train.weight_decay`, where only the learning rate moves final top-1
    (best at 1e-3, down 10 points a decade away)."""
    doc = sampled_doc(root, "optuna", n, variant={"choice": ["siglip", "siglit"]}, **grid)
    spec = validate(doc)
    exp = root / "results" / "t"
    (exp / "trials").mkdir(parents=True)
    (exp / "sweep.json").write_text(json.dumps({
        "name": "t", "fingerprint": spec_fingerprint(spec), "trials": [],
        "axes": {k: v if isinstance(v, list) else v.doc() for k, v in search.axes(spec).items()},
    }))
    rng = random.Random(0)
    for i in range(n):
        point = {"variant": rng.choice(["siglip", "siglit"]), "text_source": "templates",
                 "batch_size": 16, "n_train_classes": 4, "seed": 0,
                 "train.lr": math.exp(rng.uniform(math.log(1e-5), math.log(1e-2))),
                 "train.weight_decay": rng.uniform(0.0, 0.1)}
        point.update({k: rng.choice(v["choice"]) for k, v in grid.items()})
        cfg = resolve_trial(spec, point, trial_id=search.trial_name(point, i))
        top1 = 0.9 - 0.1 * abs(math.log10(point["train.lr"]) + 3)
        tdir = exp / "trials" / cfg.trial_id
        tdir.mkdir()
        (tdir / "config.json").write_text(cfg.model_dump_json())
        (tdir / "status.json").write_text(json.dumps({
            "status": "terminated", "stopped_early": i % 3 == 0,
            "ended_at": f"2026-01-01T10:{i:02d}:00+0000"}))
        rows = [{"step": 0, "val_top1": 0.3}, {"step": 10, "val_top1": top1, "train_loss": 0.5}]
        (tdir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return exp


def test_report_of_a_sampled_sweep(tmp_path: Path) -> None:
    """Typed columns of the sampled values, PED-ANOVA ranking the only axis that moves the
    metric first, tables that group by the grid axes only, the plots of the sampled axes."""
    from analysis.report import write_report

    paths = write_report(write_sampled_experiment(tmp_path))
    table = pq.read_table(paths["trials"])
    assert str(table.schema.field("train__lr").type) == "double"
    assert str(table.schema.field("variant").type) == "string"
    assert json.loads(table.schema.metadata[b"sweeper.sampled_axes"]) == {
        "train__lr": LR, "train__weight_decay": WD}
    trials = table.to_pandas()
    assert trials["train__lr"].between(1e-5, 1e-2).all()
    assert trials["stopped_early"].sum() == 8
    report = paths["report"].read_text()
    rows = table_after(report, "## Which axis mattered")
    assert rows[0] == ["axis", "values", "share of importance (PED-ANOVA)"]
    assert rows[1][:2] == ["train.lr", "loguniform(1e-05, 0.01)"]
    shares = {r[0]: float(r[2].rstrip("%")) for r in rows[1:]}
    assert shares["train.lr"] > 2 * max(shares["variant"], shares["train.weight_decay"])
    assert "PedAnovaImportanceEvaluator" in report
    assert "Val top-1 by train.lr" not in report  # a sampled axis is no table's rows
    best = table_after(report, "## Sampled axes")
    assert best[0] == ["trial", "variant", "train.lr", "train.weight_decay", "final top-1"]
    assert len(best) == 11 and best[1][4].startswith("88.")
    for key in ("sampled_axes", "best_so_far"):
        assert f"plots/{key}.png" in report
        assert (paths["plots"] / f"{key}.png").read_bytes().startswith(b"\x89PNG")


def test_importance_without_optuna_names_what_it_leaves_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis.dataset import load
    from analysis.importance import importance, render_importance

    exp = write_sampled_experiment(tmp_path, 24, batch_size={"choice": [8, 16]})
    trials, _ = load(exp)
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` fails
    imp = importance(trials)
    assert imp is not None and imp.method == "eta2"
    assert sorted(s.axis for s in imp.shares) == ["batch_size", "variant"]
    assert imp.not_covered == ["train__lr", "train__weight_decay"]
    assert "Not covered: train.lr, train.weight_decay" in render_importance(imp)


def test_grid_experiments_have_no_sampled_section(tmp_path: Path) -> None:
    from analysis.dataset import to_pandas
    from analysis.sampled import sampled_plots, sampled_section

    frame = pd.DataFrame({"trial_id": ["a"], "status": ["terminated"], "val_top1": [0.5]})
    frame.attrs["sampled_axes"] = {}
    assert sampled_section(frame, {}, tmp_path) == []
    assert sampled_plots(tmp_path, frame) == {}
    import pyarrow as pa

    assert to_pandas(pa.table({"x": [1]})).attrs["sampled_axes"] == {}
    assert copy.deepcopy(frame).attrs == {"sampled_axes": {}}
