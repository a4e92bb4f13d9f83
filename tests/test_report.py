"""``clbench report`` cells: mean ± sample std over seeds, and no made-up spread for a single seed."""

from __future__ import annotations

import pytest

from clbench import tables
from clbench.report import Row, render


def _row(values: dict[str, list[float]]) -> Row:
    row = Row("gpm", "permuted_mnist_5k", "9df938ea", seeds=list(range(len(values["acc"]))))
    row.values = values
    return row


def test_one_seed_shows_no_spread():
    """One seed has no std: the cell says so ("± –"), not "± 0.00" as if three seeds had agreed exactly."""
    row = _row({"acc": [87.81], "bwt": [-3.0889], "fwt": [1.5444], "forgetting": [3.1889]})
    assert [row.cell(k) for k in ("acc", "bwt", "fwt", "forgetting")] == [
        "87.81 ± –", "-3.09 ± –", "1.54 ± –", "3.19 ± –"]
    line = render([row], "md").splitlines()[2]
    assert "| 1 " in line and "± 0.00" not in line


def test_several_seeds_show_the_sample_std():
    # 87.81, 88.43, 87.46: mean 87.9, sample std sqrt(((−0.09)² + 0.53² + (−0.44)²) / 2) = 0.4914
    row = _row({"acc": [87.81, 88.43, 87.46], "bwt": [-3.0, -3.0, -3.0], "fwt": [], "forgetting": [1.0, 2.0, 3.0]})
    assert row.cell("acc") == "87.90 ± 0.49"
    assert row.cell("bwt") == "-3.00 ± 0.00"  # three equal seeds: a real spread of 0
    assert row.cell("fwt") == "–"
    assert row.cell("forgetting") == "2.00 ± 1.00"
    assert render([row], "csv").splitlines()[1] == \
        "permuted_mnist_5k,gpm,9df938ea,3,87.90 ± 0.49,-3.00 ± 0.00,–,2.00 ± 1.00"


def test_a_paper_table_cell_of_one_seed_has_no_std(tmp_path):
    """The paper tables: a reproduced cell of one seed reads "mean / mean (n=1)", its CSV std fields are empty and
    its manifest std is null."""
    import yaml

    spec = tables.load_spec("gpm") | {"name": "gpm"}
    cell = next(c for c in tables.cells(spec) if (c.method, c.column) == ("naive", "pmnist"))
    run = {"column": "pmnist", "method": "naive", "seed": 0, "config_key": cell.config_key, "run_id": "r",
           "acc": 73.03, "bwt": -21.7444, "fwt": 1.1333, "forgetting": 21.7444}
    tables.write_tables(spec, [run], tmp_path)
    line = next(ln for ln in (tmp_path / "gpm_table.md").read_text().splitlines() if ln.startswith("| SGD (naive)"))
    assert "| 73.03 / -21.74 (n=1) |" in line and "± 0.00" not in line
    csv_line = next(ln for ln in (tmp_path / "gpm_table.csv").read_text().splitlines()
                    if ln.startswith("naive,pmnist,reproduced"))
    assert csv_line == "naive,pmnist,reproduced,73.0300,,-21.7444,,1,permuted_mnist_5k"
    entry = next(e for e in yaml.safe_load((tmp_path / "manifest.yaml").read_text())["gpm"]["cells"]
                 if (e["method"], e["column"]) == ("naive", "pmnist"))
    assert entry["reproduced"] == {"acc": 73.03, "acc_std": None, "bwt": -21.74, "bwt_std": None, "seeds": [0]}


@pytest.mark.parametrize("xs", [[1.0, 2.0], [5.0, 5.0, 5.0, 9.0]])
def test_two_or_more_seeds_in_a_paper_table_keep_their_std(xs):
    mean, std = tables._mean_std(xs)
    n = len(xs)
    assert mean == pytest.approx(sum(xs) / n)
    assert std == pytest.approx((sum((x - mean) ** 2 for x in xs) / (n - 1)) ** 0.5)
