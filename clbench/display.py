"""What a person sees while a run trains: a live line on a terminal, one line per experience otherwise."""

from __future__ import annotations

import sys

import numpy as np


class Display:
    """Progress of a run: experience i/T, epoch, loss. Quiet (one line per experience) when not a TTY; ``silent``
    (ranks other than 0 of a multi-device run): nothing."""

    def __init__(self, mode: str, title: str, n_experiences: int, epochs: int) -> None:
        self.title, self.T, self.epochs = title, n_experiences, epochs
        self.silent = mode == "silent"
        live = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self._progress = None
        if live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                      TimeElapsedColumn())
            self._task = self._progress.add_task(title, total=n_experiences * epochs, info="")
            self._progress.start()

    def epoch(self, experience: int, epoch: int, loss: float) -> None:
        if self._progress is not None:
            done = experience * self.epochs + epoch + 1
            self._progress.update(self._task, completed=done, description=f"{self.title} exp {experience + 1}/{self.T}",
                                  info=f"epoch {epoch + 1}/{self.epochs} loss {loss:.4f}")

    def experience(self, experience: int, loss: float | None, acc_seen: float) -> None:
        if self.silent:
            return
        line = f"[{self.title}] experience {experience + 1}/{self.T}: acc on seen tasks {acc_seen:.2f}%"
        if loss is not None:
            line += f", last epoch loss {loss:.4f}"
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def format_matrix(R: np.ndarray) -> str:
    """The accuracy matrix as aligned text: rows = after experience i, columns = test experience j."""
    T = R.shape[0]
    head = "after\\on " + "".join(f"{j:>8d}" for j in range(T))
    rows = [f"{i:>9d}" + "".join(f"{v:8.2f}" for v in R[i]) for i in range(T)]
    return "\n".join([head, *rows])
