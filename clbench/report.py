"""``clbench report``: read the MLflow store and tabulate ACC / BWT / FWT / forgetting per strategy × benchmark.

``clbench report --table gpm`` writes a paper's table instead (:mod:`clbench.tables`).

Cells are mean ± std over seeds (sample std, n−1) with the number of seeds; one seed has no spread and shows
"mean ± –". Runs are grouped
by configuration (a hash of every non-default setting but the seed, recomputed from the run's params), so
runs that differ in any setting (epochs, ε, scenario, ...) are separate rows, told apart by the ``config``
column. When one configuration and seed was run more than once, the latest finished run counts. Runs that did
not finish (FAILED: diverged or crashed; KILLED; RUNNING: in progress or killed hard) are left out, and counted
on stderr. A store that cannot be used (a server that does not answer, a file that is not an MLflow database) is
one line on stderr and exit code 3.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass, field

from clbench.fingerprint import fingerprint_params
from clbench.tracking import TrackingError, check_store

SCORES = ("acc", "bwt", "fwt", "forgetting")


@dataclass
class Row:
    """One configuration of a strategy on a benchmark, and its scores over seeds."""

    strategy: str
    benchmark: str
    config: str
    seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SCORES})

    def cell(self, key: str) -> str:
        xs = self.values[key]
        if not xs:
            return "–"
        mean = sum(xs) / len(xs)
        if len(xs) == 1:
            return f"{mean:.2f} ± –"  # one seed: no spread to show (n = 1 in the seeds column), not ± 0.00
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        return f"{mean:.2f} ± {std:.2f}"


def collect(uri: str, experiment: str) -> list[Row]:
    """Finished runs of ``experiment``, one row per configuration, the latest run per seed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"clbench report: no MLflow experiment '{experiment}' at {uri}; run `clbench` first")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=50000)
    latest: dict[tuple[str, str, str, int], dict[str, float]] = {}
    for r in runs:
        p = r.data.params
        if "strategy.name" not in p or "acc" not in r.data.metrics:
            continue
        latest.setdefault((p["benchmark.name"], p["strategy.name"], fingerprint_params(p)[:8], int(p["seed"])),
                          r.data.metrics)
    rows: dict[tuple[str, str, str], Row] = {}
    for (benchmark, strategy, config, seed), m in sorted(latest.items()):
        row = rows.setdefault((benchmark, strategy, config), Row(strategy, benchmark, config))
        row.seeds.append(seed)
        for k in SCORES:
            if k in m:
                row.values[k].append(m[k])
    return list(rows.values())


def unfinished(uri: str, experiment: str) -> Counter[str]:
    """How many runs of ``experiment`` did not finish, by status (FAILED, KILLED, RUNNING, SCHEDULED)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return Counter()
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status != 'FINISHED'",
                              max_results=50000)
    return Counter(r.info.status for r in runs)


def render(rows: list[Row], fmt: str) -> str:
    """A markdown (``md``) or CSV table, one row per configuration of a strategy on a benchmark."""
    head = ["benchmark", "strategy", "config", "seeds", "ACC (%)", "BWT (%)", "FWT (%)", "forgetting (%)"]
    body = [[r.benchmark, r.strategy, r.config, str(len(r.seeds)), *(r.cell(k) for k in SCORES)] for r in rows]
    if fmt == "csv":
        return "\n".join(",".join(x) for x in [head, *body])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clbench report", description=__doc__)
    parser.add_argument("--uri", default="sqlite:///mlflow.db",
                        help="MLflow tracking URI; --table: several, comma-separated (default: %(default)s)")
    parser.add_argument("--experiment", default="clbench", help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument("--table", help="write a paper table (clbench/conf/table/<name>.yaml), e.g. gpm")
    parser.add_argument("--out", default="results", help="--table: output folder (default: %(default)s)")
    parser.add_argument("--runs", help="--table: build from this per-run CSV instead of MLflow (no figures)")
    parser.add_argument("--commands", action="store_true", help="--table: print each cell's command and stop")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds a tracking server has to answer (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        for uri in [] if args.runs else args.uri.split(","):  # --runs reads a CSV, not the store
            check_store(uri, args.timeout)
    except TrackingError as e:
        print(f"clbench report: {e}", file=sys.stderr)
        return 3
    if args.table:
        from pathlib import Path

        from clbench.tables import main as table_main

        return table_main(args.table, Path(args.out), args.uri, args.experiment,
                          Path(args.runs) if args.runs else None, args.commands)
    from mlflow.exceptions import MlflowException
    from requests import RequestException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        rows = collect(args.uri, args.experiment)
        left = unfinished(args.uri, args.experiment)
    except (MlflowException, SQLAlchemyError, RequestException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"clbench report: the MLflow store {args.uri} cannot be read ({first}); fix --uri", file=sys.stderr)
        return 3
    if left:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(left.items()))
        print(f"clbench report: left out {sum(left.values())} run(s) that did not finish ({counts})", file=sys.stderr)
    if not rows:
        print(f"no finished runs in experiment '{args.experiment}' at {args.uri}")
        return 1
    print(render(rows, args.format))
    return 0
