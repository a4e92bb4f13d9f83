"""``ogpsa_alignment``: OGPSA's safety-alignment stages on the official code's data (ogpsa.md §3-§4).

The official code (repository SunGL001/OGPSA, a LLaMA-Factory fork) trains on data sets that its
``data/dataset_info.json`` names; the repository does **not** ship their files (its ``data/`` folder holds
LLaMA-Factory's demo sets and that index, whose entries point at ``[your path]/<file>``). clbench reads them from
``<benchmark.data_root>/OGPSA/``, one flat folder, under the file names of that index:

* ``saferlhf2_sft``: ``saferlhf2_processed_sft_10k.json``, records ``prompt`` → ``chosen``;
* ``saferlhf2_dpo``: ``saferlhf2_processed_rl_10k.json``, records ``prompt``, ``chosen``, ``rejected``;
* ``ultrafeedback_sft_200``: ``ultrafeedback_porecessed_200.json``, records ``prompt`` → ``chosen``;
* ``halueval_sft_200``: ``halueval_sft_200.json``, records ``prompt`` → ``right_answer``;
* ``ultrafeedback_dpo``: ``ultrafeedback_porecessed_rl_10k.json``, records ``prompt``, ``chosen``, ``rejected``.

(``porecessed`` is the code's spelling.) Each file is a JSON list of records, or JSON lines, as LLaMA-Factory's
JSON loader accepts. The index declares every set in LLaMA-Factory's ``alpaca`` layout: the SFT sets map the
alpaca ``query`` (input) to ``prompt`` and the response to ``chosen`` / ``right_answer``, leaving the instruction
column at LLaMA-Factory's default ``instruction``; the preference sets (``ranking: true``) map the instruction to
``prompt`` and leave the input column at its default ``input``. LLaMA-Factory's user turn is the non-empty of
(instruction, input) joined by a newline; clbench reads those two columns the same way, each optional, and needs
the answer columns as strings.

**Experiences** (no general pre-training: the model arrives pre-trained): experience ``k`` is
``benchmark.stages[k]`` (``n_tasks`` = the number of stages): ``sft`` trains on ``saferlhf2_sft`` (prompt → the
safe answer, :class:`~clbench.streams.text.TextSample`), ``dpo`` on ``saferlhf2_dpo``
(:class:`~clbench.streams.text.PreferenceSample`); ``[sft, dpo]`` is the code's SFT→DPO.

**Test sets.** The code trains on whole files and evaluates with benchmarks and judges that are in no retrievable
text (ogpsa.md §5), so clbench holds out the **last** ``max_test_per_task`` records (default 200) of each stage's
file, disjoint from its training records (the rest, in file order), as prompt → the chosen (safe) answer. Exact
match of free text is not a meaningful safety score: the stream keeps the language model's ``exact_match`` as the
primary score (the only one :class:`~clbench.streams.text.TextStreamSpec` offers for R) and the score to read is
``loss``, the mean answer NLL of the held-out safe answers per stage (lower: the stage's safe behaviour learnt).

**Reference sets** (``Stream.references``, OGPSA's ``strategy.ref_sets``): the code's base data sets of the
stages present, the first ``reference_samples`` records of each (default 200, the code's ``base_num_samples``):
for ``sft`` ``ultrafeedback_sft_200`` and ``halueval_sft_200`` (prompt → the reference answer, TextSample); for
``dpo`` ``ultrafeedback_dpo`` (PreferenceSample: OGPSA's DPO-stage reference loss, the NLL of the chosen and the
rejected answers, is the model's ``likelihood_loss`` of such a batch).

**Prompts** (a known difference): the code wraps the user turn in the model's chat template (LLaMA-Factory's
``template`` argument, ``qwen`` in its README) and trains on the assistant turn; clbench applies no chat template:
the prompt is the user text followed by :data:`PROMPT_END`, the answer follows it directly.

Missing files fail at once (:class:`FileNotFoundError` naming every one, the folder and where they come from);
nothing is ever downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clbench.config import BenchmarkConfig, check
from clbench.streams.alignment import check_stages
from clbench.streams.core import Stream, register, stream_seed
from clbench.streams.text import (
    PreferenceSample,
    TextSample,
    TextSamples,
    TextStreamConfig,
    TextStreamSpec,
    assemble_text,
    make_text_dataset,
    text_config,
)

OGPSA_REPO = "https://github.com/SunGL001/OGPSA"
FOLDER = "OGPSA"
"""The folder under ``benchmark.data_root`` that holds the files."""

PROMPT_END = "\n"
"""What ends every prompt, before the answer (the code's chat template puts the assistant header there)."""

DEFAULT_TEST = 200
DEFAULT_REFERENCE = 200


@dataclass(frozen=True)
class OGPSAData:
    """One data set of the official code (an entry of its ``data/dataset_info.json``).

    Attributes:
        name: the data set's name in the code (``--dataset`` / ``--base_dataset``).
        file: its file name.
        instruction: the column of the alpaca instruction (first part of the user turn; optional in a record).
        query: the column of the alpaca input (second part of the user turn; optional in a record).
        answer: the response column (SFT) or the chosen answer's (preference sets).
        rejected: the rejected answer's column; None for an SFT set.
    """

    name: str
    file: str
    instruction: str
    query: str
    answer: str
    rejected: str | None = None


SAFETY = {
    "sft": OGPSAData("saferlhf2_sft", "saferlhf2_processed_sft_10k.json", "instruction", "prompt", "chosen"),
    "dpo": OGPSAData("saferlhf2_dpo", "saferlhf2_processed_rl_10k.json", "prompt", "input", "chosen", "rejected"),
}
"""Stage -> its safety training set."""

REFERENCES = {
    "sft": (OGPSAData("ultrafeedback_sft_200", "ultrafeedback_porecessed_200.json", "instruction", "prompt",
                      "chosen"),
            OGPSAData("halueval_sft_200", "halueval_sft_200.json", "instruction", "prompt", "right_answer")),
    "dpo": (OGPSAData("ultrafeedback_dpo", "ultrafeedback_porecessed_rl_10k.json", "prompt", "input", "chosen",
                      "rejected"),),
}
"""Stage -> the reference (base) sets the code's README projects off in that stage."""


@dataclass
class OGPSAAlignmentConfig(TextStreamConfig):
    """``ogpsa_alignment``'s keys, on top of :class:`TextStreamConfig`'s.

    ``max_test_per_task``: the records held out at the end of each stage's file for testing (0: 200).
    ``per_class``, ``max_words`` and ``task_prefix`` are not used (refused when set); cap the training records
    with ``max_train_per_task`` (a random subset). ``order`` and ``download`` are ignored (nothing is downloaded).

    Attributes:
        stages: the alignment stages, in order: ``sft`` and / or ``dpo`` (``[sft, dpo]``: SFT→DPO);
            ``n_tasks`` must be their number.
        reference_samples: the first records of each reference file kept as its reference set (the code's
            ``base_num_samples``, 200).
    """

    name: str = "ogpsa_alignment"
    n_tasks: int = 1
    task_prefix: bool = False
    stages: list[str] = field(default_factory=lambda: ["sft"])
    reference_samples: int = DEFAULT_REFERENCE

    def validate(self) -> None:
        """Stage, size and unused-key checks; raise :class:`~clbench.config.ConfigError` naming the key."""
        check_stages(self.stages)
        check(self.n_tasks == len(self.stages), "benchmark.n_tasks",
              f"{self.n_tasks}; benchmark.stages={list(self.stages)} makes {len(self.stages)} experiences (one per "
              f"stage, no general one): set benchmark.n_tasks={len(self.stages)}")
        check(isinstance(self.reference_samples, int) and self.reference_samples >= 1,
              "benchmark.reference_samples", f"{self.reference_samples}; must be an integer >= 1")
        for key, why in (("per_class", "cap training with benchmark.max_train_per_task"),
                         ("max_words", "texts are kept whole")):
            check(getattr(self, key) == 0, f"benchmark.{key}", f"{getattr(self, key)}; not used by "
                  f"ogpsa_alignment ({why}): leave it at 0")
        check(not self.task_prefix, "benchmark.task_prefix",
              "true; ogpsa_alignment's prompts carry no Task:/Dataset: lines: leave it false")
        super().validate()


def needed(stages: Sequence[str]) -> list[OGPSAData]:
    """The data sets the ``stages`` read: each stage's safety set and reference sets, each once, in order."""
    out: list[OGPSAData] = []
    for stage in stages:
        for data in (SAFETY[stage], *REFERENCES[stage]):
            if data not in out:
                out.append(data)
    return out


def check_files(root: str | Path, stages: Sequence[str]) -> None:
    """Check that every file ``stages`` need is in ``<root>/OGPSA``.

    Raises:
        FileNotFoundError: naming every missing file, the folder, and where the files come from.
    """
    folder = Path(root) / FOLDER
    missing = [str(folder / d.file) for d in needed(stages) if not (folder / d.file).is_file()]
    if missing:
        raise FileNotFoundError(
            f"OGPSA data files missing ({len(missing)}): {', '.join(missing)}. benchmark.stages={list(stages)} reads "
            f"them from {str(folder.resolve())!r} (benchmark.data_root/{FOLDER}, one flat folder). They are the "
            f"data sets that data/dataset_info.json of the official OGPSA repository ({OGPSA_REPO}) names, under "
            "those file names; the repository does not ship them (its entries point at '[your path]/<file>'): "
            "obtain them from its authors and copy them there. clbench never downloads them."
        )


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a LLaMA-Factory JSON data file: a JSON list of objects, or one object per line.

    Raises:
        ValueError: the file is neither, or an entry is not an object (naming the file and the entry).
    """
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: neither a JSON list of records nor JSON lines ({e})") from e
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: entry {i} is not a JSON object: {row!r:.200}")
    return rows


def _text(row: dict[str, Any], column: str, path: Path, i: int, required: bool) -> str:
    """``row[column]`` as a string ('' for an absent or null optional column)."""
    value = row.get(column)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        need = "a string" if required else "a string or absent"
        raise ValueError(f"{path}: record {i} has {column!r} = {value!r:.200}; expected {need}")
    return value


def to_sample(row: dict[str, Any], data: OGPSAData, task: int, path: Path, i: int) -> TextSample | PreferenceSample:
    """Record ``i`` of ``data``'s file as a sample of ``task``: the user text (instruction and input, the non-empty
    ones joined by a newline) + :data:`PROMPT_END`, and its answer(s).

    Raises:
        ValueError: no user text, or an answer column that is not a string.
    """
    parts = [_text(row, c, path, i, required=False) for c in (data.instruction, data.query)]
    user = "\n".join(p for p in parts if p)
    if not user:
        raise ValueError(f"{path}: record {i} has no prompt (neither {data.instruction!r} nor {data.query!r})")
    prompt = user + PROMPT_END
    answer = _text(row, data.answer, path, i, required=True)
    if data.rejected is None:
        return TextSample(prompt, answer, task)
    return PreferenceSample(prompt, answer, _text(row, data.rejected, path, i, required=True), task)


def _samples(samples: Sequence[TextSample | PreferenceSample]) -> TextSamples:
    """``samples`` with one label (the validation split's stratum) for all."""
    return TextSamples(samples, torch.zeros(len(samples), dtype=torch.int64))


def read_data(root: str | Path, data: OGPSAData, task: int, first: int | None = None
              ) -> list[TextSample | PreferenceSample]:
    """The records of ``data``'s file under ``<root>/OGPSA`` (the ``first`` ones; None: all) as samples of
    ``task``, in file order."""
    path = Path(root) / FOLDER / data.file
    return [to_sample(row, data, task, path, i) for i, row in enumerate(read_records(path)[:first])]


@register("ogpsa_alignment", config=OGPSAAlignmentConfig)
def build_ogpsa_alignment(cfg: BenchmarkConfig, seed: int) -> Stream:
    """``ogpsa_alignment`` (module docstring): one experience per stage of ``benchmark.stages``, the last
    ``max_test_per_task`` records of its file held out for testing, the stages' reference sets attached.

    Raises:
        TypeError: ``cfg`` is not an :class:`OGPSAAlignmentConfig`.
        FileNotFoundError: naming every missing file of ``<data_root>/OGPSA`` and where they come from.
        ConfigError: a stage's file holds no more records than ``max_test_per_task``.
        ValueError: a record without a prompt or with a non-string answer (naming the file and the record).
    """
    if not isinstance(cfg, OGPSAAlignmentConfig):
        raise TypeError(f"stream 'ogpsa_alignment' needs an OGPSAAlignmentConfig, got {type(cfg).__name__}")
    cfg = text_config(cfg)
    assert isinstance(cfg, OGPSAAlignmentConfig)
    check_files(cfg.data_root, cfg.stages)
    n_test = cfg.max_test_per_task or DEFAULT_TEST
    train: list[TextSamples] = []
    test: list[TextSamples] = []
    for k, stage in enumerate(cfg.stages):
        data = SAFETY[stage]
        rows = read_data(cfg.data_root, data, k)
        check(len(rows) > n_test, "benchmark.max_test_per_task",
              f"{n_test}: {data.file} has {len(rows)} records, and at least one must be left for training; "
              f"valid: 1..{len(rows) - 1}")
        train.append(_samples(rows[:-n_test]))
        test.append(_samples([TextSample(s.prompt, s.answer, k) for s in rows[-n_test:]]))
    spec = TextStreamSpec(name=cfg.name, n_tasks=cfg.n_tasks, task_names=tuple(SAFETY[s].name for s in cfg.stages),
                          label_words=((),) * cfg.n_tasks)
    stream = assemble_text(cfg, stream_seed(cfg, seed), spec, train, test)
    stream.references = {
        d.name: make_text_dataset(_samples(read_data(cfg.data_root, d, 0, cfg.reference_samples)), 0)
        for d in needed(cfg.stages) if d not in SAFETY.values()
    }
    return stream
