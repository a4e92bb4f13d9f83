"""Paper tables: cells found in MLflow by config_key, mean ± std over seeds beside the published values, and
the committed results/ regenerated exactly from the committed per-run figures."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from clbench import tables
from clbench.config import flatten

RESULTS = Path(__file__).resolve().parent.parent / "results"


@pytest.fixture(scope="module")
def spec():
    return tables.load_spec("gpm") | {"name": "gpm"}


def test_every_cell_has_its_own_config_key_and_a_runnable_command(spec):
    cells = tables.cells(spec)
    assert len({c.config_key for c in cells}) == len(cells)
    gpm = next(c for c in cells if (c.method, c.column) == ("gpm", "pmnist"))
    assert gpm.command([0, 1, 2]) == "clbench -m benchmark=permuted_mnist_5k model=mlp strategy=gpm seed=0,1,2"
    # the default job (README) is the GPM / PMNIST-stand-in cell
    assert gpm.config_key == tables.fingerprint(tables.compose([])[0], with_seed=False)


def _log(client, exp_id, overrides, seed, acc, bwt, T=2, extra=None, drop=()):
    """A finished run with the params clbench logs for ``clbench <overrides> seed=<seed>`` (minus ``drop``)."""
    from mlflow.entities import Param

    run = client.create_run(exp_id)
    rid = run.info.run_id
    cfg = tables.compose([*overrides, f"seed={seed}"])[0]
    params = {k: str(v) for k, v in flatten(asdict(cfg)).items() if k not in drop}
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    for k, v in ({"acc": acc, "bwt": bwt, "fwt": 0.0, "forgetting": -bwt} | (extra or {})).items():
        client.log_metric(rid, k, v)
    for i in range(T):
        for j in range(T):
            client.log_metric(rid, f"acc_task/{j}", 50.0 + 10 * i - j, step=i)
        client.log_metric(rid, "basis_dim/hidden.0", 10.0 * (i + 1), step=i)
    client.set_terminated(rid, "FINISHED")
    return rid


def test_report_from_mlflow(tmp_path, spec):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("clbench", artifact_location=str(tmp_path / "art"))
    cells = {(c.method, c.column): c for c in tables.cells(spec)}
    gpm, naive = cells[("gpm", "pmnist")], cells[("naive", "pmnist")]
    for seed, acc in enumerate((90.0, 92.0, 94.0)):
        # a run logged before model.time_steps existed (a key added later, at its default) still counts
        _log(client, exp_id, gpm.overrides, seed, acc, -2.0, drop=("model.time_steps",) if seed == 2 else ())
    _log(client, exp_id, naive.overrides, 0, 70.0, -20.0)
    _log(client, exp_id, naive.overrides, 7, 10.0, -90.0)  # a seed outside the table: ignored
    _log(client, exp_id, (*naive.overrides, "engine.epochs=2"), 1, 1.0, -99.0)  # another configuration: ignored
    out = tmp_path / "results"
    assert tables.main("gpm", out, uri, "clbench", None, False) == 0
    md = (out / "gpm_table.md").read_text()
    gpm_line = next(line for line in md.splitlines() if line.startswith("| GPM |"))
    assert "93.91 ± 0.16 / -3.00 ± 0.00 [P-cr]" in gpm_line and "92.00 ± 2.00 / -2.00 ± 0.00 (n=3)" in gpm_line
    naive_line = next(line for line in md.splitlines() if line.startswith("| SGD (naive) |"))
    assert "70.00 / -20.00 (n=1)" in naive_line
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())["gpm"]["cells"]
    entry = next(e for e in manifest if (e["method"], e["column"]) == ("gpm", "pmnist"))
    assert entry["reproduced"]["seeds"] == [0, 1, 2] and entry["published"]["source"] == "P-cr"
    assert entry["command"].endswith("strategy=gpm seed=0,1,2")
    runs = tables.read_runs_csv(out / "gpm_runs.csv")
    assert [(r["method"], r["seed"]) for r in runs] == [("naive", 0), ("gpm", 0), ("gpm", 1), ("gpm", 2)]
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["gpm_pmnist_accuracy_matrices.png", "gpm_pmnist_basis_size.png",
                       "gpm_pmnist_task_curves.png"]


@pytest.mark.parametrize("name", sorted(p.name.removesuffix("_runs.csv") for p in RESULTS.glob("*_runs.csv")))
def test_committed_table_is_regenerated_exactly_from_the_committed_runs(tmp_path, name):
    """results/<name>_table.md and .csv, and the table's section of manifest.yaml, follow from
    results/<name>_runs.csv and the spec (every committed table: gpm, hlop, fot)."""
    spec = tables.load_spec(name) | {"name": name}
    tables.write_tables(spec, tables.read_runs_csv(RESULTS / f"{name}_runs.csv"), tmp_path)
    for file in (f"{name}_table.md", f"{name}_table.csv"):
        assert (tmp_path / file).read_text() == (RESULTS / file).read_text(), file
    ours = yaml.safe_load((tmp_path / "manifest.yaml").read_text())
    committed = yaml.safe_load((RESULTS / "manifest.yaml").read_text())
    assert ours[name] == committed[name]


@pytest.mark.parametrize("name", sorted(p.name.removesuffix("_runs.csv") for p in RESULTS.glob("*_runs.csv")))
def test_each_committed_run_still_has_its_cells_config_key(name):
    """Every committed run's config_key is the one its cell's command composes to today: a change of a default
    (e.g. the federated engine defaults) or of the hash that moved a committed cell to another configuration
    would leave `clbench report --table` unable to find its runs in MLflow and `--commands` printing a command
    that no longer gives them."""
    spec = tables.load_spec(name) | {"name": name}
    keys = {(c.method, c.column): c.config_key for c in tables.cells(spec)}
    runs = tables.read_runs_csv(RESULTS / f"{name}_runs.csv")
    assert runs and all(r["config_key"] == keys[(r["method"], r["column"])] for r in runs), \
        sorted({(r["method"], r["column"]) for r in runs if r["config_key"] != keys.get((r["method"], r["column"]))})


def test_a_federated_run_trains_at_the_federated_engine_defaults():
    """strategy=fot / fedavg select engine=federated (lr 0.1, batch 16: the FOT table's client SGD); every other
    strategy keeps GPM's engine (lr 0.01, batch 10); engine=default or engine.lr override it."""
    fot, fedavg, gpm, back, lr = tables.compose(["strategy=fot"], ["strategy=fedavg"], ["strategy=gpm"],
                                                ["strategy=fot", "engine=default"], ["strategy=fot", "engine.lr=0.05"])
    for cfg in (fot, fedavg):
        assert (cfg.engine.lr, cfg.engine.batch_size, cfg.engine.weight_decay) == (0.1, 16, 0.0)
    for cfg in (gpm, back):
        assert (cfg.engine.lr, cfg.engine.batch_size, cfg.engine.weight_decay) == (0.01, 10, 0.0)
    assert (lr.engine.lr, lr.engine.batch_size) == (0.05, 16)
    # the FOT table's permuted-digits cell is the default federated run with its own strategy and stream keys
    spec = tables.load_spec("fot") | {"name": "fot"}
    cell = next(c for c in tables.cells(spec) if (c.method, c.column) == ("fot", "pmnist"))
    same = [o for o in cell.overrides if not o.startswith(("engine.lr", "engine.batch_size"))]
    assert tables.fingerprint(tables.compose(same)[0], with_seed=False) == cell.config_key


def test_the_olora_table_lists_the_papers_cells_and_runs_its_setting_per_order(tmp_path):
    """O-LoRA's table: AA only (no BWT published), source marks per cell, the paper's setting as each order
    column's command (order 6 with the code's λ schedule), a clbench column for an order only once it has runs."""
    spec = tables.load_spec("olora") | {"name": "olora"}
    cells = {(c.method, c.column): c for c in tables.cells(spec)}
    assert {c for _, c in cells} == {"o1", "o2", "o3", "o4", "o5", "o6", "keyword_topics"}  # + the stand-in
    assert ("l2p", "o1") not in cells and ("olora", "std_avg") not in cells  # published only
    o6 = cells[("olora", "o6")].command([0])
    assert o6.startswith("clbench -m experiment=olora_t5_order6 strategy=olora 'strategy.lambda1=[0,0.5,")
    cfg = tables.compose(list(cells[("olora", "o6")].overrides))[0]
    assert (cfg.benchmark.name, cfg.benchmark.order, cfg.benchmark.n_tasks) == ("olora_long", 6, 15)
    assert (cfg.model.pretrained, cfg.engine.batch_size, cfg.engine.lr) == ("google-t5/t5-large", 64, 1e-3)
    assert len(cfg.strategy.lambda1) == 15 and cfg.strategy.lambda2[6] == 0.3  # RTE: 0.3 in long.sh
    seqft = tables.compose(list(cells[("seqft", "o2")].overrides))[0]
    assert (seqft.strategy.name, seqft.model.adapter, seqft.benchmark.order) == ("naive", "none", 2)

    tables.write_tables(spec, [], tmp_path)
    md = (tmp_path / "olora_table.md").read_text()
    assert "| O-LoRA | 75.40 [P] | 75.70 [P] | 76.30 [P] | 75.80 [P] | 72.30 [PR] | 64.80 [PR] | 71.60 [PR] | " \
           "69.60 [P*] |" in md
    assert "| L2P (not in clbench) | – | – | – | 60.70 [P*] |" in md and "Order 1: clbench" not in md
    run = {"column": "o1", "method": "olora", "seed": 0, "config_key": cells[("olora", "o1")].config_key,
           "run_id": "r", "acc": 74.0, "bwt": -1.0, "fwt": 0.0, "forgetting": 1.0}
    tables.write_tables(spec, [run], tmp_path)
    md = (tmp_path / "olora_table.md").read_text()
    assert "Order 1: published | Order 1: clbench | Order 2: published" in md
    assert "| O-LoRA | 75.40 [P] | 74.00 / -1.00 (n=1) | 75.70 [P] |" in md


def test_olora_report_draws_the_adapter_angles(tmp_path):
    """O-LoRA's runs log the principal angles between each task's adapter and the earlier ones; the report draws
    them per method beside the accuracy matrices."""
    from mlflow.tracking import MlflowClient

    spec = tables.load_spec("olora") | {"name": "olora"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("clbench", artifact_location=str(tmp_path / "art"))
    olora = next(c for c in tables.cells(spec) if (c.method, c.column) == ("olora", "keyword_topics"))
    rid = _log(client, exp_id, olora.overrides, 0, 30.0, -60.0, T=3)
    for t in (1, 2):
        for i in range(t):
            client.log_metric(rid, f"adapter_angle_mean/{i}", 89.0 + i, step=t)
    assert tables.main("olora", tmp_path / "results", uri, "clbench", None, False) == 0
    figures = sorted(p.name for p in (tmp_path / "results" / "figures").iterdir())
    assert "olora_keyword_topics_adapter_angles.png" in figures
    assert "olora_keyword_topics_accuracy_matrices.png" in figures


@pytest.mark.parametrize(("rogo", "gpm", "source", "halving"), [
    ("rogo", "gpm_grad", "gradients", "halve"),          # ROGO's CIFAR code vs GPM with its memory source
    ("rogo_nohalve", "gpm_grad", "gradients", "none"),   # the relaxation alone, gradient memory
    ("rogo_act", "gpm", "activations", "none"),          # the relaxation alone, GPM's activation memory
])
def test_the_gpm_tables_rogo_rows_differ_from_their_gpm_row_as_labelled(spec, rogo, gpm, source, halving):
    """Issue 18 §3: each ROGO row of the conv column has a GPM row with the same memory (ε, its increment, n_s,
    rank rule, memory source) and the same engine, model and stream, so that the relaxation and the lr halving
    are the only differences, as the table's notes say."""
    cells = {(c.method, c.column): c for c in tables.cells(spec)}
    r, g = tables.compose(list(cells[(rogo, "cifar100_conv")].overrides), list(cells[(gpm, "cifar100_conv")].overrides))
    assert (r.strategy.name, g.strategy.name) == ("rogo", "gpm")
    assert (r.strategy.basis_source, r.strategy.on_success) == (source, halving)
    assert asdict(r.engine) == asdict(g.engine) and asdict(r.model) == asdict(g.model)
    assert asdict(r.benchmark) == asdict(g.benchmark)
    shared = asdict(g.strategy).keys() - {"name"}
    assert {k: asdict(r.strategy)[k] for k in shared} == {k: asdict(g.strategy)[k] for k in shared}


def test_a_score_may_average_several_metrics_and_a_missing_one_is_nan():
    assert tables.score_value({"a": 1.0, "b": 3.0}, "a") == 1.0
    assert tables.score_value({"a": 1.0, "b": 3.0}, ["a", "b"]) == 2.0
    assert math.isnan(tables.score_value({"a": 1.0}, ["a", "b"]))
    assert tables.score_value({"a": 1.0, "b": 3.0}, ["a", "b"], "hmean") == 1.5  # 2 / (1 + 1/3)
    assert tables.score_value({"a": 0.0, "b": 3.0}, ["a", "b"], "hmean") == 0.0  # TOFU: any 0 makes it 0
    assert math.isnan(tables.score_value({"a": 1.0}, ["a", "b"], "hmean"))
    with pytest.raises(ValueError, match="hmean"):
        tables.score_value({"a": 1.0}, "a", "median")


def test_forget_quality_is_computed_from_each_run_and_its_reference_run(tmp_path):
    """The o3 table's two-run score: a cell's forget-set truth ratios at its last evaluation against the reference
    run's (benchmark.withhold=3, same seed) after experience 0; other evaluations and groups are not read; a seed
    without its reference run shows no value (NaN in the runs CSV) and the other seeds still count."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from clbench.metrics import PER_SAMPLE_HEADER, forget_quality

    spec = tables.load_spec("o3") | {"name": "o3"}
    spec["methods"] = [m for m in spec["methods"] if m["key"] in ("o3", "grad_ascent")]
    (ref,) = tables.reference_cells(spec)
    assert (ref.method, ref.column) == ("reference:forget_quality", "facts") and "benchmark.withhold=3" in ref.overrides
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("clbench", artifact_location=str(tmp_path / "art"))

    def logged(overrides, seed, by_after):
        rid = _log(client, exp_id, overrides, seed, 0.0, 0.0)
        lines = [f"truth_ratio,{after},{1 + k % 3},forget_{1 + k % 3},{v}" for after, values in by_after.items()
                 for k, v in enumerate(values)]
        lines += [f"truth_ratio,{after},0,retain,{100 + after}" for after in by_after]  # another group: not read
        client.log_text(rid, "\n".join([PER_SAMPLE_HEADER, *lines]) + "\n", "per_sample.csv")

    cells = {(c.method, c.column): c for c in tables.cells(spec)}
    retain = [0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    logged(ref.overrides, 0, {-1: [9.0] * 6, 0: retain, 3: [50.0] * 6})
    unlearnt = [0.85, 0.95, 1.05, 1.15, 1.25, 1.35]
    logged(cells[("o3", "facts")].overrides, 0, {0: [0.01] * 6, 3: unlearnt})
    logged(cells[("o3", "facts")].overrides, 1, {3: unlearnt})  # its reference never ran
    logged(cells[("grad_ascent", "facts")].overrides, 0, {3: [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]})
    runs, _ = tables.collect_runs(spec, uri, "clbench")
    quality = {(r["method"], r["seed"]): r["forget_quality"] for r in runs}
    assert quality[("o3", 0)] == pytest.approx(forget_quality(np.array(unlearnt), np.array(retain)), abs=1e-6)
    assert quality[("o3", 0)] > 0.5 and math.isnan(quality[("o3", 1)])
    assert quality[("grad_ascent", 0)] == pytest.approx(2 / math.comb(12, 6), abs=1e-6)  # fully separated
    tables.write_runs_csv(runs, tmp_path / "o3_runs.csv", spec)
    agg = tables.aggregate(spec, tables.read_runs_csv(tmp_path / "o3_runs.csv"))
    assert agg[("o3", "facts")]["n"] == 2 and agg[("o3", "facts")]["forget_quality"][1] is None  # one value
    md = tables.render_markdown(spec, agg)
    o3_line = next(line for line in md.splitlines() if line.startswith("| O3 (the"))
    assert o3_line.endswith(f"/ {quality[('o3', 0)]:.3g} [n=1] (n=2) |")  # one of the 2 seeds has its reference
    wrong = spec | {"scores": [sc | {"ks": sc["ks"] | {"groups": ["forget_9"]}} if "ks" in sc else sc
                               for sc in spec["scores"]]}
    with pytest.raises(SystemExit, match=r"'forget_quality'.*no 'truth_ratio' values of groups \['forget_9'\]"):
        tables.collect_runs(wrong, uri, "clbench")
    manifest = yaml.safe_load(tables.render_manifest(spec, agg, tables.cells(spec)))["o3"]
    assert manifest["references"][0]["command"].endswith("benchmark.withhold=3 strategy=naive seed=0,1,2")
