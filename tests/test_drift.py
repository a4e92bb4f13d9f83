"""Drift: the code still produces the committed tables' runs.

``tests/test_tables.py`` re-renders each table from its committed ``results/<table>_runs.csv``, so it cannot
notice when the code no longer produces those runs. Here one cheap committed cell of each table (seed 0) is run
again from its exact command and its scores are compared with its line of the runs CSV: ACC, BWT and FWT to the
4 decimals the CSV keeps (bit for bit: the runs are deterministic on one CPU thread, and every cell below re-ran
exactly when this test was written). The CSV's ``forgetting`` was logged when :func:`clbench.metrics.forgetting`
took the max over every earlier row of R (including rows from before task j was trained); it is checked against
that old formula recomputed on the new R, and the current definition (max over rows l ∈ [j, T−2]) can only be
smaller or equal.

Which cell per table (the cheapest that a change of the shared code would move):
- fot: FOT IID on the permuted-digits stand-in (strategy, federated loop, GPSE, FedProject);
- gpm: GPM on the PMNIST stand-in (the default job: stream, MLP, GPM's memory and projection);
- rogo: ROGO on the PMNIST stand-in (GPM + relaxation search, the gpm table's ROGO row);
- hlop: SNN naive on the PMNIST stand-in (the spiking MLP and DSR neuron; the HLOP rows are being re-tuned);
- olora: O-LoRA on the keyword-topics stand-in (tiny Llama with LoRA, its orthogonality loss).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import run_config

from clbench import tables

RESULTS = Path(__file__).resolve().parent.parent / "results"

CELLS = [  # (table, method, column)
    ("fot", "fot", "pmnist"),
    ("gpm", "gpm", "pmnist"),
    ("gpm", "rogo", "pmnist"),
    ("hlop", "naive", "pmnist"),
    ("olora", "olora", "keyword_topics"),
]


def old_forgetting(R: np.ndarray) -> float:
    """The formula the committed runs logged: mean_{j<T−1} (max_{i<T−1} R[i, j] − R[T−1, j])."""
    T = R.shape[0]
    return float(np.mean([R[: T - 1, j].max() - R[-1, j] for j in range(T - 1)]))


@pytest.mark.slow
@pytest.mark.parametrize(("table", "method", "column"), CELLS, ids=[f"{t}-{m}-{c}" for t, m, c in CELLS])
def test_a_committed_cell_reruns_to_its_committed_scores(workdir, table, method, column):
    from clbench.experiment import run

    spec = tables.load_spec(table) | {"name": table}
    cell = next(c for c in tables.cells(spec) if (c.method, c.column) == (method, column))
    committed = next(r for r in tables.read_runs_csv(RESULTS / f"{table}_runs.csv")
                     if (r["method"], r["column"], r["seed"]) == (method, column, 0))
    assert committed["config_key"] == cell.config_key  # the command still names the committed configuration
    result = run(run_config(workdir, *cell.overrides, "seed=0"))
    got = {k: round(result.scores[k], 4) for k in ("acc", "bwt", "fwt")}
    assert got == {k: committed[k] for k in ("acc", "bwt", "fwt")}
    assert round(old_forgetting(result.R), 4) == committed["forgetting"]
    assert round(result.scores["forgetting"], 4) <= committed["forgetting"]  # max over a subset of those rows
