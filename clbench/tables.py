"""Paper tables: a spec (``clbench/conf/table/<name>.yaml``) → per-run figures → tables, manifest and figures.

A spec lists the table's columns (benchmarks, each with the overrides of the stream clbench runs for it), its
rows (methods, each with its own overrides per column) and the published numbers with their sources. A column
with ``published: false`` has no published counterpart (a stand-in for a setting the paper reports no figure of);
one with ``stands_in_for: <key>`` is a second stand-in for the real benchmark of column ``<key>``: it has no
published column of its own (the table shows one published column per real benchmark), and its cells are compared
with that column's published values (manifest). A reproduced cell shows ACC / BWT, or the spec's ``scores`` (a
score may also compare each run with a reference run, as TOFU's KS-test forget quality does:
:func:`reference_cells`). A
cell's runs are its command with ``seed`` ∈ ``seeds``; they are found in MLflow by the hash of their logged config
(every non-default setting but the seed: :func:`clbench.fingerprint.fingerprint_params`), so a run of any other
setting never lands in a cell.

``clbench report --table gpm`` does two steps, so a table can be checked without the MLflow store:

1. MLflow → ``results/<name>_runs.csv``: one line per (cell, seed) with its scores (the latest finished run);
2. that CSV → ``results/<name>_table.md`` / ``.csv`` (reproduced mean ± std beside the published values) and
   ``results/manifest.yaml`` (each cell's exact command, published value with source, reproduced value).
   ``--runs FILE`` starts from a committed CSV instead (step 2 only).

Figures (step 1 only, from MLflow): per column, the mean accuracy matrices side by side per method, the
per-task accuracy curves, the memory size per layer across tasks (``basis_dim/<layer>``, HLOP's
``hlop_rows/<layer>``) and O-LoRA's principal angles between each task's adapter and the earlier ones
(``adapter_angle_mean/<i>``).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clbench.compose import load
from clbench.fingerprint import fingerprint, fingerprint_params

SPEC_DIR = Path(__file__).resolve().parent / "conf" / "table"
RUN_FIELDS = ("column", "method", "seed", "config_key", "run_id", "acc", "bwt", "fwt", "forgetting")
HEADLINE = ("acc", "bwt", "fwt", "forgetting")
DEFAULT_SCORES = ({"key": "acc", "metric": "acc", "label": "ACC"}, {"key": "bwt", "metric": "bwt", "label": "BWT"})


def scores(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The scores a reproduced cell shows, in order: the spec's ``scores`` (each a ``key``, a ``label`` and either
    the MLflow ``metric`` whose last value it takes, or a list of metrics whose last values it averages (``mean:
    hmean``: harmonically), or a two-run ``ks`` score: :func:`reference_cells`), else ACC / BWT."""
    return list(spec.get("scores") or DEFAULT_SCORES)


MEANS = ("mean", "hmean")
"""How a score averages a list of metrics: arithmetic, or harmonic (TOFU's model utility: 0 when any is 0)."""


def score_value(metrics: dict[str, float], metric: str | list[str], mean: str = "mean") -> float:
    """A score of a run from its metrics' last values: ``metric``'s, or the ``mean`` (:data:`MEANS`) of a list's
    (NaN if one is missing)."""
    if mean not in MEANS:
        raise ValueError(f"a table score's mean must be one of {MEANS}, got {mean!r}")
    values = np.array([metrics.get(n, math.nan) for n in ([metric] if isinstance(metric, str) else metric)])
    if mean == "hmean" and not np.isnan(values).any():
        return 0.0 if (values <= 0).any() else float(len(values) / np.sum(1.0 / values))
    return float(np.mean(values))


def run_fields(spec: dict[str, Any]) -> tuple[str, ...]:
    """The columns of a table's runs CSV: :data:`RUN_FIELDS` and the spec's other scores."""
    return RUN_FIELDS + tuple(s["key"] for s in scores(spec) if s["key"] not in RUN_FIELDS)


@dataclass(frozen=True)
class Cell:
    """A (method, column) pair clbench runs: its overrides and the config_key its runs carry."""

    method: str
    column: str
    overrides: tuple[str, ...]
    config_key: str

    def command(self, seeds: list[int]) -> str:
        quoted = [f"'{o}'" if any(c in o for c in "[], ") else o for o in self.overrides]
        return " ".join(["clbench -m", *quoted, "seed=" + ",".join(map(str, seeds))])


def load_spec(name: str) -> dict[str, Any]:
    path = SPEC_DIR / f"{name}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))
        raise SystemExit(f"clbench report: no table '{name}' ({path}); valid: {valid}")
    return yaml.safe_load(path.read_text())


def compose(*overrides: list[str]) -> list[Any]:
    """The validated :class:`~clbench.config.RunConfig` of ``clbench <overrides>`` (as the CLI builds it), for
    each list of overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(SPEC_DIR.parent), version_base="1.3"):
        return [load(hydra_compose(config_name="config", overrides=o)) for o in overrides]


_KEYS: dict[tuple[str, ...], str] = {}  # overrides → config_key


def cells(spec: dict[str, Any]) -> list[Cell]:
    """Every cell clbench runs, in table order."""
    pairs = []
    for m in spec["methods"]:
        for col in spec["columns"]:
            own = (m.get("overrides") or {}).get(col["key"])
            if own is not None and col["overrides"] is not None:
                pairs.append((m["key"], col["key"], (*col["overrides"], *own)))
    todo = list(dict.fromkeys(o for *_, o in pairs if o not in _KEYS))
    for overrides, cfg in zip(todo, compose(*map(list, todo)), strict=True):
        _KEYS[overrides] = fingerprint(cfg, with_seed=False)
    return [Cell(m, c, o, _KEYS[o]) for m, c, o in pairs]


def reference_cells(spec: dict[str, Any]) -> list[Cell]:
    """The reference runs of the spec's two-run scores, in table order. A score ``{key, label, ks: {score, groups,
    reference: {<column>: [overrides]}, reference_after}}`` is TOFU's KS-test forget quality
    (:func:`clbench.metrics.forget_quality`): the p-value between the per-sample ``score`` values
    (``per_sample.csv``) of a cell's run over ``groups`` at its last evaluation and those of the reference run (the
    column's overrides + ``reference[column]``, same seed) after experience ``reference_after`` (−1: initially),
    e.g. a retain model that never learnt the forget set. A reference cell's method is ``reference:<score key>``."""
    pairs = [(f"reference:{sc['key']}", col["key"], (*col["overrides"], *sc["ks"]["reference"][col["key"]]))
             for sc in scores(spec) if "ks" in sc for col in spec["columns"]
             if col["overrides"] is not None and col["key"] in sc["ks"]["reference"]]
    todo = list(dict.fromkeys(o for *_, o in pairs if o not in _KEYS))
    for overrides, cfg in zip(todo, compose(*map(list, todo)), strict=True):
        _KEYS[overrides] = fingerprint(cfg, with_seed=False)
    return [Cell(m, c, o, _KEYS[o]) for m, c, o in pairs]


# ------------------------------------------------------------------------------------------ step 1: MLflow


def _per_sample(client: Any, run_id: str) -> str:
    """A run's ``per_sample.csv`` artifact (its stream's per-sample scores), as text."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "per_sample.csv", tmp)
        except Exception as e:  # MLflow raises its own or an OSError, depending on the store
            raise SystemExit(f"clbench report: run {run_id} has no per_sample.csv artifact ({e}); its stream keeps "
                             "no per-sample scores, or it ran before clbench kept them: run it again") from e
        return Path(path).read_text()


def _ks_values(spec: dict[str, Any], rows: list[dict[str, Any]], references: dict[tuple[str, str, int], str],
               clients: dict[str, Any]) -> None:
    """Fill each row's two-run scores (:func:`reference_cells`) from its run's and its reference run's
    ``per_sample.csv``; NaN (shown "–") where the reference has not run."""
    from clbench.metrics import forget_quality, per_sample_values

    texts: dict[str, str] = {}

    def text(run_id: str) -> str:
        if run_id not in texts:
            texts[run_id] = _per_sample(clients[run_id], run_id)
        return texts[run_id]

    missing = set()
    for sc in (sc for sc in scores(spec) if "ks" in sc):
        ks = sc["ks"]
        for row in rows:
            ref = references.get((sc["key"], row["column"], row["seed"]))
            if row["column"] not in ks["reference"]:
                row[sc["key"]] = math.nan
                continue
            if ref is None:
                missing.add((sc["key"], row["column"], row["seed"]))
                row[sc["key"]] = math.nan
                continue
            after = ks.get("reference_after", 0)
            mine = per_sample_values(text(row["run_id"]), ks["score"], None, ks["groups"])
            theirs = per_sample_values(text(ref), ks["score"], after, ks["groups"])
            for run_id, values, when in ((row["run_id"], mine, "its last evaluation"), (ref, theirs, f"after {after}")):
                if not len(values):
                    raise SystemExit(f"clbench report: score '{sc['key']}': run {run_id}'s per_sample.csv has no "
                                     f"'{ks['score']}' values of groups {ks['groups']} at {when}; check the spec's "
                                     "ks.score, ks.groups and ks.reference_after")
            row[sc["key"]] = float(f"{forget_quality(mine, theirs):.6g}")  # significant digits: p may be 1e-20
    for key, column, seed in sorted(missing):
        print(f"clbench report: no reference run for '{key}' in column '{column}', seed {seed} "
              "(`--commands` prints its command)")


def collect_runs(spec: dict[str, Any], uri: str, experiment: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the runs CSV (latest finished run per cell and seed) and each run's MLflow client.

    ``uri`` may list several stores separated by commas (e.g. sweeps run side by side into separate SQLite
    files, which do not take concurrent writers well)."""
    from mlflow.tracking import MlflowClient

    wanted = {c.config_key: c for c in cells(spec)}
    refs: dict[str, list[Cell]] = {}  # config_key → the reference cells it serves (two scores may share one)
    for c in reference_cells(spec):
        refs.setdefault(c.config_key, []).append(c)
    seeds = set(spec["seeds"])
    found: list[tuple[int, dict[str, Any]]] = []  # (start time, row)
    found_refs: list[tuple[int, tuple[str, str, int], str]] = []  # (start time, (score, column, seed), run id)
    clients: dict[str, Any] = {}
    for one in uri.split(","):
        client = MlflowClient(tracking_uri=one)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"clbench report: no MLflow experiment '{experiment}' at {one}; run the cells first")
        for r in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                    max_results=50000):
            if "strategy.name" not in r.data.params:
                continue
            key = fingerprint_params(r.data.params)  # recomputed: robust to keys added since
            cell = wanted.get(key)
            seed = int(r.data.params.get("seed", -1))
            if key in refs and seed in seeds:
                clients[r.info.run_id] = client
                found_refs += [(r.info.start_time, (c.method.split(":", 1)[1], c.column, seed), r.info.run_id)
                               for c in refs[key]]
            if cell is None or seed not in seeds:
                continue
            m = r.data.metrics
            clients[r.info.run_id] = client
            extra = {sc["key"]: round(score_value(m, sc["metric"], sc.get("mean", "mean")), 4)
                     for sc in scores(spec) if "ks" not in sc}
            found.append((r.info.start_time, {
                "column": cell.column, "method": cell.method, "seed": seed, "config_key": cell.config_key,
                "run_id": r.info.run_id, **{k: round(m[k], 4) for k in HEADLINE}, **extra}))
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for _, row in sorted(found, key=lambda f: f[0], reverse=True):  # the latest run of a cell and seed counts
        rows.setdefault((row["method"], row["column"], row["seed"]), row)
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (_order(spec, k[0], k[1]), k[2]))]
    references = {where: run_id for _, where, run_id in sorted(found_refs, key=lambda f: f[0])}  # the latest
    _ks_values(spec, ordered, references, clients)
    return ordered, clients


def _order(spec: dict[str, Any], method: str, column: str) -> tuple[int, int]:
    methods = [m["key"] for m in spec["methods"]]
    columns = [c["key"] for c in spec["columns"]]
    return methods.index(method), columns.index(column)


def write_runs_csv(rows: list[dict[str, Any]], path: Path, spec: dict[str, Any] | None = None) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=run_fields(spec or {}), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())


def read_runs_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a runs CSV: every column but the cell's names, seed and run id is a score (a float)."""
    text = {"column", "method", "config_key", "run_id"}
    with path.open() as f:
        return [{**r, "seed": int(r["seed"]), **{k: float(v) for k, v in r.items() if k not in text | {"seed"}}}
                for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------ step 2: tables


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (n − 1) of ``xs``; the std is None for one value (no spread, not a spread of 0)."""
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _csv_num(x: float | None, p_value: bool = False) -> str:
    return "" if x is None else f"{x:.6g}" if p_value else f"{x:.4f}"


def _fmt(mean: float | None, std: float | None, p_value: bool = False) -> str:
    """``mean ± std`` with 2 decimals (a p-value: 3 significant digits); "–" for no value."""
    if mean is None:
        return "–"
    form = ".3g" if p_value else ".2f"
    return f"{mean:{form}}" if std is None else f"{mean:{form}} ± {std:{form}}"


def aggregate(spec: dict[str, Any], runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (method, column): each of the spec's :func:`scores` as mean ± std over seeds, and the published
    values."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for m in spec["methods"]:
        for col in spec["columns"]:
            key = (m["key"], col["key"])
            mine = [r for r in runs if (r["method"], r["column"]) == key]
            entry: dict[str, Any] = {"n": len(mine), "seeds": sorted(r["seed"] for r in mine)}
            for score in scores(spec):
                values = [r[score["key"]] for r in mine
                          if not ("ks" in score and math.isnan(r.get(score["key"], math.nan)))]
                entry[score["key"]] = _mean_std(values) if values else None  # a two-run score without reference
                if "ks" in score:
                    entry[f"{score['key']}_n"] = len(values)  # the seeds whose reference ran
            pub = (m.get("published") or {}).get(col.get("stands_in_for") or col["key"])
            entry["published"] = None if pub is None else {
                "acc": pub[0], "acc_std": pub[1], "bwt": pub[2], "bwt_std": pub[3], "source": pub[4]}
            out[key] = entry
    return out


def _has_published(column: dict[str, Any]) -> bool:
    """Whether the table shows a published column for ``column`` (not for a second stand-in of a benchmark, nor
    for a column marked ``published: false``)."""
    return not column.get("stands_in_for") and column.get("published", True)


def _published(p: dict[str, Any] | None, missing: str = "–") -> str:
    """A published cell: ACC / BWT (ACC alone where the paper gives no BWT) and its source mark; ``missing`` (the
    spec's ``published_missing``, e.g. "not retrieved") where there is none."""
    if p is None:
        return missing
    acc = _fmt(p["acc"], p["acc_std"])
    return (acc if p["bwt"] is None else f"{acc} / {_fmt(p['bwt'], p['bwt_std'])}") + f" [{p['source']}]"


def _reproduced_columns(spec: dict[str, Any], agg: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    """Column key → title of its clbench column: every stand-in column, and a real-data column (one with
    overrides but no stand-in, e.g. a paper's experiment config) once it has runs."""
    out = {}
    for c in spec["columns"]:
        if c["stand_in"]:
            out[c["key"]] = f"{c['title']}: clbench, stand-in"
        elif c["overrides"] is not None and any(agg[(m["key"], c["key"])]["n"] for m in spec["methods"]):
            out[c["key"]] = f"{c['title']}: clbench"
    return out


def render_markdown(spec: dict[str, Any], agg: dict[tuple[str, str], dict[str, Any]]) -> str:
    cols = spec["columns"]
    mine = _reproduced_columns(spec, agg)
    head = ["Method"]
    for c in cols:
        if _has_published(c):
            head.append(f"{c['title']}: published")
        if c["key"] in mine:
            head.append(mine[c["key"]])
    lines = [f"# {spec['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in spec["methods"]:
        row = [m["label"]]
        for c in cols:
            e = agg[(m["key"], c["key"])]
            if _has_published(c):
                row.append(_published(e["published"], spec.get("published_missing", "–")))
            if c["key"] in mine:
                planned = (m.get("overrides") or {}).get(c["key"]) is not None
                shown = " / ".join(_fmt(*(e[sc["key"]] or (None, None)), p_value="ks" in sc)
                                   + (f" [n={e[sc['key'] + '_n']}]" if e.get(sc["key"] + "_n", e["n"]) != e["n"]
                                      else "")
                                   for sc in scores(spec)) if e["n"] else ""
                row.append(f"{shown} (n={e['n']})" if e["n"] else "not run yet" if planned else "–")
        lines.append("| " + " | ".join(row) + " |")
    labels = " / ".join(sc["label"] for sc in scores(spec))
    two_run = any("ks" in sc for sc in scores(spec))
    unit = "in % (the two-run scores: p-values)" if two_run else "in %"
    seeds = "n = seeds; [n = …]: the seeds of a two-run score whose reference ran, where fewer" if two_run \
        else "n = seeds"
    lines += ["", f"Cells: {labels} {unit}, mean ± std (sample std over seeds; {seeds}). Stand-ins:"]
    lines += [f"- {c['title']}: {c['stand_in']}" for c in cols if c["stand_in"]]
    covered = {c.get("stands_in_for") for c in cols}  # a real benchmark another column stands in for
    lines += [f"- {c['title']}: {c.get('note', 'no offline stand-in run yet')}" for c in cols
              if not c["stand_in"] and c["overrides"] is None and not c.get("derived") and c["key"] not in covered]
    real = [c["title"] for c in cols if not c["stand_in"] and c["overrides"] is not None]
    if real:
        lines += [f"- {', '.join(real)}: the paper's setting (each cell's command in results/manifest.yaml); it "
                  "needs the data and the model, which cannot be downloaded here"]
    lines += ["", "Sources:"] + [f"- [{k}] {v}" for k, v in spec["sources"].items()]
    if spec.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in spec["notes"]]
    lines += ["", "Each cell's exact command: results/manifest.yaml. Regenerate: `clbench report --table "
              f"{spec['name']}` (from MLflow) or `clbench report --table {spec['name']} --runs "
              f"results/{spec['name']}_runs.csv`.", ""]
    return "\n".join(lines)


def render_csv(spec: dict[str, Any], agg: dict[tuple[str, str], dict[str, Any]]) -> str:
    """One line per published and per reproduced cell; a published value fills the first two scores' places."""
    keys = [sc["key"] for sc in scores(spec)]
    p_values = {sc["key"] for sc in scores(spec) if "ks" in sc}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "column", "kind", *(f for k in keys for f in (k, f"{k}_std")), "n", "source"])
    for m in spec["methods"]:
        for c in spec["columns"]:
            e = agg[(m["key"], c["key"])]
            if (p := e["published"]) is not None and _has_published(c):
                values = [p["acc"], p["acc_std"], p["bwt"], p["bwt_std"]] + [""] * (2 * len(keys) - 4)
                w.writerow([m["key"], c["key"], "published", *values[: 2 * len(keys)], "", p["source"]])
            if e["n"]:
                values = [_csv_num(v, k in p_values) for k in keys for v in (e[k] or (None, None))]
                w.writerow([m["key"], c["key"], "reproduced", *values, e["n"],
                            c["stand_in"].split(":")[0] if c["stand_in"] else "clbench"])
    return buf.getvalue()


def render_manifest(spec: dict[str, Any], agg: dict[tuple[str, str], dict[str, Any]], all_cells: list[Cell],
                    existing: dict[str, Any] | None = None) -> str:
    """``results/manifest.yaml``: this table's cells (other tables' entries in ``existing`` are kept)."""
    entries = []
    for cell in all_cells:
        e = agg[(cell.method, cell.column)]
        entry: dict[str, Any] = {"method": cell.method, "column": cell.column,
                                 "command": cell.command(spec["seeds"]), "config_key": cell.config_key}
        if e["published"] is not None:
            entry["published"] = {k: e["published"][k] for k in ("acc", "bwt", "source")}
        digits = {sc["key"]: 6 if "ks" in sc else 2 for sc in scores(spec)}  # a p-value keeps more
        entry["reproduced"] = None if not e["n"] else {
            **{k: v for key, d in digits.items() for mean, std in [e[key] or (None, None)]
               for k, v in ((key, _round(mean, d)), (f"{key}_std", _round(std, d)))},
            "seeds": e["seeds"]}
        entries.append(entry)
    manifest = dict(existing or {})
    manifest[spec["name"]] = {"table": f"results/{spec['name']}_table.md", "cells": entries}
    refs = [{"score": c.method.split(":", 1)[1], "column": c.column, "command": c.command(spec["seeds"]),
             "config_key": c.config_key} for c in reference_cells(spec)]
    if refs:
        manifest[spec["name"]]["references"] = refs
    return yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True, width=120)


def write_tables(spec: dict[str, Any], runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Step 2: the markdown and CSV tables and the manifest from the per-run rows."""
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(spec, runs)
    name = spec["name"]
    manifest_path = out / "manifest.yaml"
    existing = yaml.safe_load(manifest_path.read_text()) if manifest_path.exists() else None
    written = {out / f"{name}_table.md": render_markdown(spec, agg), out / f"{name}_table.csv": render_csv(spec, agg),
               manifest_path: render_manifest(spec, agg, cells(spec), existing)}
    for path, text in written.items():
        path.write_text(text)
    return list(written)


# ------------------------------------------------------------------------------------------ figures


def _grid(plt: Any, n: int, width: float, height: float, **kw: Any) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels, at most 5 a row; unused panels are hidden."""
    cols = min(5, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                             layout="constrained", **kw)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig: Any, title: str, stem: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    path = Path(f"{stem}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_figures(spec: dict[str, Any], runs: list[dict[str, Any]], clients: dict[str, Any], out: Path) -> list[Path]:
    """Per column: mean accuracy matrices side by side, per-task accuracy curves, memory size per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    labels = {m["key"]: m["label"] for m in spec["methods"]}
    written = []
    for col in spec["columns"]:
        mine = [r for r in runs if r["column"] == col["key"]]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        if not methods:
            continue
        mats: dict[str, np.ndarray] = {}
        bases: dict[str, dict[str, dict[int, float]]] = {}
        angles: dict[str, dict[str, dict[int, float]]] = {}  # O-LoRA: new adapter vs each earlier one
        for method in methods:
            stack = []
            for r in (r for r in mine if r["method"] == method):
                client = clients[r["run_id"]]

                def history(key: str, run_id: str = r["run_id"], client: Any = client) -> dict[int, float]:
                    return {m.step: m.value for m in client.get_metric_history(run_id, key)}

                keys = [k for k in client.get_run(r["run_id"]).data.metrics if k.startswith("acc_task/")]
                T = len(keys)
                R = np.full((T, T), np.nan)
                for j in range(T):
                    for i, v in history(f"acc_task/{j}").items():
                        R[i, j] = v
                stack.append(R)
                if r["seed"] == min(x["seed"] for x in mine if x["method"] == method):
                    dims = [k for k in client.get_run(r["run_id"]).data.metrics
                            if k.startswith(("basis_dim/", "hlop_rows/"))]  # GPM's memory, HLOP's rows
                    if dims:
                        bases[method] = {k.split("/", 1)[1]: history(k) for k in dims}
                    between = [k for k in client.get_run(r["run_id"]).data.metrics
                               if k.startswith("adapter_angle_mean/")]
                    if between:
                        angles[method] = {k.split("/", 1)[1]: history(k) for k in between}
            mats[method] = np.mean(stack, axis=0)
        T = next(iter(mats.values())).shape[0]
        fig, axes = _grid(plt, len(methods), 2.4, 2.5)
        for ax, method in zip(axes, methods, strict=False):
            im = ax.imshow(mats[method], vmin=0, vmax=100, cmap="viridis")
            ax.set_title(labels[method], fontsize=8)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.tick_params(labelsize=6)
            ax.set_xlabel("test task j", fontsize=7)
            ax.set_ylabel("after task i", fontsize=7)
        fig.colorbar(im, ax=list(axes), shrink=0.6, label="accuracy (%)")
        prefix = figdir / f"{spec['name']}_{col['key']}"
        written.append(_save(fig, f"{col['title']} stand-in: mean R (%) over seeds", f"{prefix}_accuracy_matrices"))

        fig, axes = _grid(plt, len(methods), 2.4, 2.2, sharey=True)
        for ax, method in zip(axes, methods, strict=False):
            R = mats[method]
            for j in range(T):
                ax.plot(range(j, T), R[j:, j], marker=".", lw=1, ms=3)
            ax.set_title(labels[method], fontsize=8)
            ax.set_xlabel("after task i", fontsize=7)
            ax.set_ylabel("accuracy on task j (%)", fontsize=7)
            ax.tick_params(labelsize=6)
        written.append(_save(fig, f"{col['title']} stand-in: accuracy of each task as training goes on",
                             f"{prefix}_task_curves"))

        if bases:
            fig, axes = _grid(plt, len(bases), 3.2, 2.6)
            for ax, (method, layers) in zip(axes, bases.items(), strict=True):
                for layer, hist in layers.items():
                    steps = sorted(hist)
                    ax.plot(steps, [hist[s] for s in steps], marker=".", label=layer)
                ax.set_title(labels[method], fontsize=8)
                ax.set_xlabel("after task i", fontsize=7)
                ax.tick_params(labelsize=6)
                ax.legend(fontsize=5)
                ax.set_ylabel("basis columns", fontsize=7)
            written.append(_save(fig, f"{col['title']} stand-in: memory size per layer", f"{prefix}_basis_size"))

        if angles:
            fig, axes = _grid(plt, len(angles), 3.2, 2.6)
            for ax, (method, per_adapter) in zip(axes, angles.items(), strict=True):
                for i, hist in sorted(per_adapter.items(), key=lambda kv: int(kv[0])):
                    steps = sorted(hist)
                    ax.plot(steps, [hist[s] for s in steps], marker=".", label=f"adapter {i}")
                ax.set_xticks(range(1, T))
                ax.set_title(labels[method], fontsize=8)
                ax.set_xlabel("after task t", fontsize=7)
                ax.set_ylabel("mean principal angle (°)", fontsize=7)
                ax.set_ylim(0, 90)
                ax.tick_params(labelsize=6)
                ax.legend(fontsize=5)
            written.append(_save(fig, f"{col['title']}: task t's adapter vs each earlier one (one seed)",
                                 f"{prefix}_adapter_angles"))
    return written


def write_scatter(spec: dict[str, Any], runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """The spec's ``scatter: {x: <score key>, y: <score key>}``: one panel per stand-in column, each method at its
    mean (x, y) over seeds with ± std bars (OGPSA's general-vs-safety figure). Nothing without ``scatter``."""
    if not spec.get("scatter"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = spec["scatter"]["x"], spec["scatter"]["y"]
    label = {sc["key"]: sc["label"].split(" (")[0] for sc in scores(spec)}
    agg = aggregate(spec, runs)
    columns = [c for c in spec["columns"] if any(agg[(m["key"], c["key"])]["n"] for m in spec["methods"])]
    if not columns:
        return []
    fig, axes = _grid(plt, len(columns), 3.4, 3.0, sharex=True, sharey=True)
    for ax, col in zip(axes, columns, strict=True):
        for k, m in enumerate(spec["methods"]):  # one colour per method across the panels
            e = agg[(m["key"], col["key"])]
            if not e["n"]:
                continue
            (mx, sx), (my, sy) = e[x], e[y]
            ax.errorbar(mx, my, xerr=sx or 0, yerr=sy or 0, fmt="o", ms=4, capsize=2, color=f"C{k % 10}",
                        label=m["label"].split(" (")[0])
        ax.set_title(col["title"], fontsize=7)
        ax.set_xlabel(f"{label[x]} (%)", fontsize=7)
        ax.set_ylabel(f"{label[y]} (%)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    return [_save(fig, f"{spec['title'].split(':')[0]}: {label[y]} vs {label[x]}, mean ± std over seeds",
                  str(figdir / f"{spec['name']}_scatter"))]


def main(name: str, out: Path, uri: str, experiment: str, runs_csv: Path | None, commands: bool) -> int:
    spec = load_spec(name) | {"name": name}
    if commands:
        for cell in [*cells(spec), *reference_cells(spec)]:
            print(cell.command(spec["seeds"]))
        return 0
    if runs_csv is not None:
        runs, clients = read_runs_csv(runs_csv), None
    else:
        runs, clients = collect_runs(spec, uri, experiment)
        if not runs:
            print(f"no finished runs of table '{name}' at {uri}; `clbench report --table {name} --commands` "
                  "prints the commands")
            return 1
        out.mkdir(parents=True, exist_ok=True)
        write_runs_csv(runs, out / f"{name}_runs.csv", spec)
    paths = write_tables(spec, runs, out) + write_scatter(spec, runs, out)
    if clients is not None:
        paths += write_figures(spec, runs, clients, out)
    print("wrote " + ", ".join(map(str, paths)))
    return 0
