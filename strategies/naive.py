"""Naive fine-tuning: plain SGD on each experience in turn; the lower bound every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

from clbench.config import StrategyConfig
from strategies import register
from strategies.base import Strategy


@dataclass
class NaiveConfig(StrategyConfig):
    """Naive fine-tuning has no keys of its own."""


@register("naive")
class Naive(Strategy):
    """No protection at all: every hook is the base class's no-op."""

    config_class = NaiveConfig
