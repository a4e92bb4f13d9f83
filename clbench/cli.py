"""Command line: ``clbench [overrides]`` runs one experiment (``-m`` sweeps), ``clbench report`` tabulates.

Hydra composes ``clbench/conf``; :func:`clbench.compose.load` validates it before anything is built.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from clbench.compose import load
from clbench.config import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _run(cfg: DictConfig) -> float:
    try:
        run_cfg = load(cfg)
    except ConfigError as e:
        print(f"clbench: config error: {e}", file=sys.stderr)
        sys.exit(2)
    from clbench.runner import execute

    try:
        result = execute(run_cfg)
    except ConfigError as e:
        print(f"clbench: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:  # missing data: the message names the path and benchmark.download
        print(f"clbench: {e}", file=sys.stderr)
        sys.exit(2)
    return result.scores["acc"]


def main() -> None:
    """Entry point of the ``clbench`` console script."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from clbench.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    _run()


if __name__ == "__main__":
    main()
