"""The continual loop over a stream (DESIGN.md "Data flow"): train, protect, evaluate, log, checkpoint."""

from __future__ import annotations

import logging
import math
import random
import tempfile
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Avalanche creates loggers at import, which it refuses on ranks other than 0 once a process group exists: it is
# imported here, before any group (a spawned rank imports this module to unpickle its task), and not in
# clbench.engine, which the command line imports even for `clbench report` (4 s of start-up).
import avalanche.benchmarks  # noqa: F401
import numpy as np
import torch
from omegaconf import OmegaConf

from clbench import checkpoint, distributed, metrics, preemption
from clbench.config import ConfigError, RunConfig
from clbench.context import Context
from clbench.display import Display, format_matrix
from clbench.engine import DivergenceError, Engine, epoch_place
from clbench.federated.loop import Clients, FederatedLoop
from clbench.fingerprint import fingerprint, run_params
from clbench.models import build_model
from clbench.places import PlaceError, check_writable, run_lock
from clbench.streams import batch_source, build_stream
from clbench.streams.batches import BatchSource, TensorBatchSource, needs_collate
from clbench.tracking import Tracker, TrackingError, check_store, git_sha, package_versions, run_key, sqlite_path
from strategies import build_strategy
from strategies.base import Strategy

if TYPE_CHECKING:
    from lightning.fabric import Fabric

log = logging.getLogger(__name__)

_EVAL_KEY = 3  # order of the test batches (see Context.eval_order)


@dataclass
class RunResult:
    """What a run produced: R (%) of the stream's primary score, the initial model's primary scores b, the four
    headline scores, the MLflow run id, the matrices of every other score the model gives (same layout), and the
    lines of ``per_sample.csv`` (the stream's per-sample scores, :data:`clbench.metrics.PER_SAMPLE_HEADER`)."""

    R: np.ndarray
    initial: np.ndarray
    scores: dict[str, float]
    run_id: str
    others: dict[str, np.ndarray] = field(default_factory=dict)
    per_sample: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_name(cfg: RunConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.strategy.name}-{cfg.benchmark.name}-s{cfg.seed}"


def _matrix_csv(M: np.ndarray) -> str:
    T = M.shape[0]
    header = "after_experience," + ",".join(f"task_{j}" for j in range(T))
    rows = [f"{i}," + ",".join(f"{v:.8f}" for v in M[i]) for i in range(T)]
    return "\n".join([header, *rows]) + "\n"


def _write_artifacts(tracker: Tracker, cfg: RunConfig, R: np.ndarray, b: np.ndarray,
                     others: dict[str, np.ndarray], per_sample: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = R.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "accuracy_matrix.csv").write_text(_matrix_csv(R))
        for name, M in others.items():  # every other score of the model, per cell
            (d / f"{name}_matrix.csv").write_text(_matrix_csv(M))
        if per_sample:  # the stream's per-sample scores, every evaluation (TOFU's forget quality reads them)
            (d / "per_sample.csv").write_text("\n".join([metrics.PER_SAMPLE_HEADER, *per_sample]) + "\n")
        (d / "initial_accuracy.csv").write_text(
            "task,accuracy\n" + "".join(f"{j},{v:.4f}\n" for j, v in enumerate(b)))
        (d / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        fig, ax = plt.subplots(figsize=(1.0 + 0.55 * T, 0.8 + 0.5 * T))
        im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
        for i in range(T):
            for j in range(T):
                ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if R[i, j] < 60 else "black")
        ax.set_xlabel("test experience j")
        ax.set_ylabel("after training experience i")
        ax.set_title(f"R: {run_name(cfg)}", fontsize=9)
        fig.colorbar(im, ax=ax, label="accuracy (%)")
        fig.tight_layout()
        fig.savefig(d / "accuracy_matrix.png", dpi=120)
        plt.close(fig)
        for f in sorted(d.iterdir()):
            tracker.log_artifact(f)


def setup(cfg: RunConfig, fabric: Fabric | None = None) -> tuple[Context, Strategy]:
    """What a run builds from its config before it trains: threads, seeds, stream, model, Fabric and the
    strategy, set up on the context. Federated clients on Flower build the same (:mod:`clbench.flower.app`).

    Raises:
        ConfigError: what only the stream, the model, Fabric or the strategy can check; nothing is logged yet.
    """
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    try:
        stream = build_stream(cfg.benchmark, cfg.seed)
    except FileNotFoundError as e:  # the data; name the model's missing weights too, so one attempt shows both
        also = cfg.model.missing_files()
        if also is None:
            raise
        raise FileNotFoundError(f"{e} Also missing: {also}") from e
    try:
        module = build_model(cfg.model, stream.spec)
        if fabric is None:
            fabric = distributed.make_fabric(cfg.engine)
    except ValueError as e:  # a benchmark / model / engine key that cannot be honoured here
        raise ConfigError(str(e)) from e
    if str(cfg.engine.precision).startswith("bf16") and fabric.device.type == "cuda" \
            and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"bad value for 'engine.precision': {cfg.engine.precision} needs bf16, which "
                          f"{torch.cuda.get_device_name(fabric.device)} lacks; use 16-mixed or 32-true")
    strategy = build_strategy(cfg.strategy)
    module = strategy.wrap_model(module)
    model = fabric.setup_module(module)
    for method in ("loss", "score", "outputs"):
        model.mark_forward_method(method)
    sources = partial(batch_source, device=fabric.device, max_bytes=cfg.engine.cache_bytes, collate=module.collate)
    ctx = Context(model=model, module=module, fabric=fabric, stream=stream, seed=cfg.seed,
                  batch_size=cfg.engine.batch_size, eval_batch_size=cfg.engine.eval_batch_size,
                  epochs=cfg.engine.epochs, sources=sources, trainer=Engine(cfg.engine, fabric))
    strategy.setup(ctx)  # may still refuse the config (e.g. a per-layer list of the wrong length)
    return ctx, strategy


def run(cfg: RunConfig, clients: Clients | None = None) -> RunResult:
    """Run one continual experiment end to end (resuming from its checkpoint when ``cfg.resume``).

    Each cell (after experience i, test experience j) is scored with the model's named scores
    (:meth:`clbench.models.base.ContinualModel.score`); R holds the stream's primary one (accuracy, exact match),
    the others are logged beside it. A federated strategy (``fedavg``, ``fot``) trains each experience with
    :class:`clbench.federated.loop.FederatedLoop` instead of the engine on one learner; the rest (stream, model,
    evaluation of the global model on every test experience, tracking, artifacts) is shared. In-process federated
    runs are checkpointed at every round end and resume like any run; Flower runs are not checkpointed (the config
    refuses ``resume=true`` for them). With ``engine.devices`` > 1 the run is trained by that many ranks
    (:mod:`clbench.distributed`). A run on Flower starts
    in :func:`clbench.runner.execute`, whose ServerApp calls this function with its SuperNodes as ``clients``.

    The places the run writes (checkpoint folder, SQLite store), the tracking store and the checkpoint to resume
    from are checked first, before anything is built or logged; the run then holds its checkpoint folder's lock
    (:func:`clbench.places.run_lock`), so a second process of the same config is refused, not a second writer.
    A non-finite epoch loss stops the run (the engine's check, or the one here for a strategy's own loop and a
    federated round); an exception marks the MLflow run FAILED (with the error as its ``error`` tag), keeping
    what it logged, and a KeyboardInterrupt marks it KILLED. A cluster's signal (SIGTERM, SIGUSR1/2) stops it with
    :class:`clbench.preemption.Stopped` (KILLED, tagged); the next start of the config continues it, as does a
    requeued SLURM job (:mod:`clbench.preemption`).

    Args:
        cfg: the run's config.
        clients: the federated transport (None: in-process clients).

    Raises:
        clbench.places.PlaceError: a place the run writes is not writable, or this config runs in another
            process now (nothing logged).
        clbench.tracking.TrackingError: the tracking store cannot be used (nothing logged).
        clbench.checkpoint.CheckpointError: ``resume=true`` and the checkpoint cannot be read (nothing logged).
        clbench.engine.DivergenceError: the loss of an epoch (or a federated round) is NaN or ±inf.
    """
    check_writable(Path(cfg.checkpoint_dir), "checkpoint_dir")
    store = sqlite_path(cfg.tracking.uri)
    if store is not None:
        check_writable(store, "tracking.uri", is_file=True)
    check_store(cfg.tracking.uri, cfg.tracking.timeout)
    path = checkpoint.checkpoint_path(cfg)
    try:
        fabric = distributed.make_fabric(cfg.engine)
    except (ValueError, RuntimeError) as e:  # an accelerator / devices / precision this machine lacks
        raise ConfigError(f"engine.accelerator={cfg.engine.accelerator}, engine.devices={cfg.engine.devices}, "
                          f"engine.precision={cfg.engine.precision} cannot run here: {e}") from e
    # A process that spawns the ranks waits for them and passes a scheduler's signals on to them.
    spawner = preemption.stoppable(path.parent, forward=distributed.children) if distributed.spawns(fabric) else None
    with spawner or nullcontext():
        return distributed.launch(fabric, _run_rank, cfg, clients, path)


def _run_rank(fabric: Fabric, cfg: RunConfig, clients: Clients | None, path: Path) -> RunResult:
    """:func:`run` on one rank (the only one on one device): rank 0 holds the run lock, writes the stop marker and
    decides whether to resume (a marker, a requeued job), which every rank then follows."""
    lead = fabric.global_rank == 0
    with ExitStack() as held:
        refused = None
        if lead:
            try:
                held.enter_context(run_lock(path.parent, "checkpoint_dir"))
            except PlaceError as e:
                refused = e
        held.enter_context(preemption.stoppable(path.parent, lead=lead))
        resume = cfg.resume or (lead and refused is None and preemption.continues(path.parent))
        refused, resume = distributed.from_lead(fabric, (refused, resume))
        if refused is not None:  # every rank stops, none waits in a collective for rank 0
            raise refused
        if resume and not cfg.resume:
            if lead:
                print(f"{run_name(cfg)} was stopped by a signal or requeued: continuing it (resume=true implied)")
            cfg = replace(cfg, resume=True)
        state = checkpoint.load(path) if cfg.resume else None
        if lead:
            preemption.clear(path.parent)
        return _run_held(cfg, clients, path, state, fabric)


def _run_held(cfg: RunConfig, clients: Clients | None, path: Path, state: dict[str, Any] | None,
              fabric: Fabric) -> RunResult:
    """:func:`run` on one rank once its places are checked, its run lock held and its checkpoint (if any) read.
    Every rank trains and evaluates; rank 0 alone logs, checkpoints and prints (:mod:`clbench.distributed`)."""
    lead = fabric.global_rank == 0
    ctx, strategy = setup(cfg, fabric)
    model, module, stream, sources = ctx.model, ctx.module, ctx.stream, ctx.sources
    spec = stream.spec
    T, primary = spec.n_tasks, spec.primary_score
    engine = ctx.trainer
    assert isinstance(engine, Engine)
    bench = stream.benchmark
    splits = {"train": bench.train_stream, "test": bench.test_stream, "valid": getattr(bench, "valid_stream", None)}
    for split, experiences in splits.items():
        for j, e in enumerate(experiences or []):
            if len(e.dataset) == 0:
                raise ConfigError(f"benchmark '{spec.name}': experience {j} has no {split} samples; check "
                                  "benchmark.* (caps, validation_fraction, n_tasks)")
    try:  # samples the model tokenizes are collated once, now, so that what it refuses is refused before training
        tests = [sources(e.dataset) for e in bench.test_stream]
        collated = {i: sources(e.dataset) for i, e in enumerate(bench.train_stream) if needs_collate(e.dataset)}
    except ValueError as e:
        raise ConfigError(f"benchmark '{spec.name}' with model '{cfg.model.name}': {e}") from e

    group_names = getattr(spec, "groups", ())
    kept_scores = getattr(spec, "per_sample", ())

    def evaluate_all(after: int) -> dict[str, np.ndarray]:
        """Every named score of the model on every test experience: name → one value per experience. The
        per-sample values of the stream's ``per_sample`` scores go to ``per_sample`` (CSV lines)."""
        model.eval()
        cells = []
        for j, s in enumerate(tests):
            strategy.evaluate_as(ctx, j)  # a no-op but for task-identity oracles (per_task_ft)
            s = strategy.scored_source(ctx, j, s)  # the source itself but for per-input fields (O3's gate)
            kept = metrics.PerSample(kept_scores) if kept_scores else None
            cells.append(metrics.evaluate(model.score, s.batches(cfg.engine.eval_batch_size, shuffle=True,
                                                                 generator=ctx.eval_order(_EVAL_KEY, j)),
                                          fabric.device, groups=group_names, kept=kept))
            if kept is not None:
                per_sample.extend(kept.lines(after, j, group_names))
        strategy.evaluate_as(ctx, None)
        model.train()
        if primary not in cells[0]:
            raise ConfigError(f"benchmark '{spec.name}' ranks by the score '{primary}', which model "
                              f"'{cfg.model.name}' does not give (it gives {sorted(cells[0])})")
        names = dict.fromkeys(name for c in cells for name in c)  # a group's score: NaN where it has no samples
        return {name: np.array([c.get(name, np.nan) for c in cells]) for name in names}

    federation = None
    if strategy.federated:  # splits every task over the clients: too many clients is still a config error here
        federation = FederatedLoop(cfg.federated, cfg.engine, ctx, strategy, clients)  # type: ignore[arg-type]
    R = np.full((T, T), np.nan)
    others: dict[str, np.ndarray] = {}
    per_sample: list[str] = []  # per_sample.csv's lines so far (metrics.PER_SAMPLE_HEADER)
    if state is not None:
        strategy.load_state_dict(state["strategy"])
        module.begin_experience(min(state["experience"], T - 1))  # the trainable part the experience had
        strategy.rebuild(ctx)  # what the strategy added to the model (adapters), before the weights load
        module.load_state_dict(state["model"])
        if federation is not None:  # the loop's position; the global θ is the model just loaded
            federation.load_state_dict(state["federation"], module)
        R, b, start, others = state["R"], state["initial"], state["experience"], state["others"]
        per_sample = list(state.get("per_sample", []))
        if kept_scores and "per_sample" not in state:
            print(f"warning: {path} predates per-sample scores: this run's per_sample.csv will hold only the "
                  "evaluations from here on")
        print(f"Resuming {run_name(cfg)} from {path} (experience {min(start + 1, T)}/{T}, "
              f"epoch {state['next_epoch']})")
    elif cfg.resume:
        print(f"resume=true but there is no checkpoint at {path}: starting afresh")
    tracker: Tracker | distributed.SilentTracker = distributed.SilentTracker()
    if lead:
        tracker = Tracker(cfg.tracking, run_name(cfg), run_id=None if state is None else state["run_id"],
                          tags={"strategy": cfg.strategy.name, "benchmark": cfg.benchmark.name,
                                "seed": str(cfg.seed)}, run_key=run_key(path.parent))
    display = Display(cfg.engine.progress if lead else "silent", cfg.strategy.name, T,
                      cfg.engine.epochs if federation is None else max(federation.rounds))
    last_loss: list[float] = []
    anchors: dict[str, dict[str, torch.Tensor]] = {}  # the experience's anchors, per split (ContinualModel.anchors)
    ddp_gap: list[float] = []  # several devices: how far a rank's own strategy state was from rank 0's
    owns_loop = strategy.overrides("train_experience")  # its loop cannot restart mid-experience

    def snapshot(experience: int, next_epoch: int, with_optimizer: bool) -> None:
        if not lead or (cfg.federated.engine == "flower" and federation is not None):  # Flower's: not checkpointed
            return
        checkpoint.save(path, {
            "experience": experience, "next_epoch": next_epoch, "model": module.state_dict(),
            "optimizer": ctx.optimizer.state_dict() if with_optimizer and ctx.optimizer else None,
            "schedule": ctx.schedule.state_dict() if with_optimizer and ctx.schedule else None,
            "strategy": strategy.state_dict(), "rng": checkpoint.rng_state(), "R": R, "initial": b,
            "others": others, "per_sample": per_sample, "step": ctx.step, "run_id": tracker.run_id,
            "anchors": anchors, "federation": None if federation is None else federation.state_dict()})

    def train_experience(i: int) -> None:
        """Experience i on one learner: the engine (or the strategy's own loop), resumable mid-experience."""
        ctx.train_source = collated.pop(i, None) or sources(bench.train_stream[i].dataset)
        valid = splits["valid"]
        ctx.valid_source = None if valid is None else sources(valid[i].dataset)
        if state is not None and i == start:
            checkpoint.set_rng_state(state["rng"])  # before any hook that may draw random numbers
        mid = state is not None and i == start and state["optimizer"] is not None
        ctx.step = state["step"] if mid else 0
        module.begin_experience(i)  # (a no-op on resume: done before the strategy's rebuild)
        # what the loss needs from the model as the experience starts (DPO's and NPO's reference log-probabilities)
        saved = state["anchors"] if mid else {}
        anchors.clear()
        ctx.train_source = _anchored(ctx, strategy, ctx.train_source, cfg.engine.eval_batch_size, "train", saved,
                                     anchors)
        if ctx.valid_source is not None:
            ctx.valid_source = _anchored(ctx, strategy, ctx.valid_source, cfg.engine.eval_batch_size, "valid", saved,
                                         anchors)
        if not mid:
            strategy.before_experience(ctx)
        ctx.optimizer = engine.optimizer(strategy.parameters_to_train(ctx), i)
        ctx.schedule = engine.schedule(ctx.optimizer, module)
        first_epoch = 0
        if mid:
            ctx.optimizer.load_state_dict(state["optimizer"])
            ctx.schedule.load_state_dict(state["schedule"])
            first_epoch = state["next_epoch"]

        # Metrics are logged before the snapshot that covers them: a kill in between logs the same value
        # again at the same step on resume (the resumed run recomputes it exactly); none is ever lost.
        def on_epoch_end(epoch: int, loss: float, extra: dict[str, float] | None = None) -> None:
            if not math.isfinite(loss):  # a strategy's own loop (the engine raises before it calls this)
                lr = (extra or {}).get("lr", float("nan"))
                raise DivergenceError(loss, epoch_place(ctx, epoch, cfg.engine.epochs), lr,
                                      "engine.first_lr" if i == 0 and cfg.engine.first_lr is not None else "engine.lr")
            tracker.log_metrics({"loss": loss} | (extra or {}), step=i * cfg.engine.epochs + epoch)
            display.epoch(i, epoch, loss)
            last_loss[:] = [loss]
            if cfg.engine.checkpoint_every_epoch and not owns_loop:
                snapshot(i, epoch + 1, with_optimizer=True)

        strategy.attach(ctx)
        try:
            if owns_loop:
                strategy.train_experience(ctx, on_epoch_end)
            else:
                engine.fit(ctx, strategy, first_epoch, on_epoch_end)
        finally:
            strategy.detach(ctx)
        strategy.after_experience(ctx)
        gap = distributed.sync_state(fabric, strategy)  # rank 0's bases on every rank
        if fabric.world_size > 1:
            ddp_gap[:] = [gap]
        ctx.optimizer = ctx.schedule = None

    def on_round(i: int, r: int, step: int, scores: dict[str, float]) -> None:
        """A federated round's metrics, at step = the round's index over the run."""
        if not math.isfinite(scores["round_loss"]):
            raise DivergenceError(scores["round_loss"], f"experience {i + 1}/{T}, round {r + 1}", cfg.engine.lr,
                                  "engine.lr")
        tracker.log_metrics(scores, step=step)
        display.epoch(i, r, scores["round_loss"])
        last_loss[:] = [scores["round_loss"]]

    def on_round_end(i: int, next_round: int) -> None:
        """A federated round is complete: checkpoint it (a kill loses at most the round in progress)."""
        if cfg.engine.checkpoint_every_epoch:
            snapshot(i, next_round, with_optimizer=False)

    try:
        if state is None:
            params = run_params(cfg) | {f"version.{k}": v for k, v in package_versions().items()}
            tracker.log_params(params | {"git_sha": git_sha(), "device": str(fabric.device),
                                         "config_key": fingerprint(cfg, with_seed=False)})
            notes = getattr(module, "collate_notes", {})
            if notes:
                tracker.log_metrics({f"data/{k}": v for k, v in notes.items()}, step=0)
            initial = evaluate_all(-1)
            b, start = initial[primary], 0
            others = {k: np.full((T, T), np.nan) for k in initial if k != primary}
            snapshot(0, 0, with_optimizer=False)  # from here on a killed run resumes into this MLflow run
        for i in range(start, T):
            ctx.experience, ctx.epoch = i, 0
            per_exp: dict[str, float] = {}
            if federation is None:
                train_experience(i)
            else:
                start_round = 0
                if state is not None and i == start:  # continue the task where the checkpoint stands
                    checkpoint.set_rng_state(state["rng"])
                    start_round = federation.next_round
                per_exp = federation.train_task(ctx, partial(on_round, i), start_round, partial(on_round_end, i))
            row = evaluate_all(i)
            R[i] = row[primary]
            per_exp |= {"acc_exp": metrics.acc_seen(R, i), "bwt_exp": metrics.bwt_seen(R, i)}
            per_exp |= {f"acc_task/{j}": R[i, j] for j in range(T)} | strategy.diagnostics()
            if ddp_gap:
                per_exp["ddp/state_gap"] = ddp_gap[0]
            for name, M in others.items():
                M[i] = row[name]
                seen = M[i, : i + 1][~np.isnan(M[i, : i + 1])]
                if seen.size:
                    per_exp[f"{name}_exp"] = float(seen.mean())
                per_exp |= {f"{name}_task/{j}": M[i, j] for j in range(T) if not np.isnan(M[i, j])}
            tracker.log_metrics(per_exp, step=i)
            display.experience(i, last_loss[0] if last_loss else None, per_exp["acc_exp"])
            snapshot(i + 1, 0, with_optimizer=False)
        display.close()
        totals = {} if federation is None else federation.totals()
        tracker.log_metrics(metrics.summary(R, b) | totals, step=T - 1)  # also when resumed after the last snapshot
        if lead:
            _write_artifacts(tracker, cfg, R, b, others, per_sample)
    except BaseException as error:
        display.close()
        _close_failed(tracker, error)
        raise
    tracker.finish()
    if not lead:
        return RunResult(R=R, initial=b, scores=metrics.summary(R, b), run_id=tracker.run_id, others=others,
                         per_sample=per_sample)
    return _finish_print(cfg, R, b, tracker.run_id, others, primary, per_sample)


def _anchored(ctx: Context, strategy: Strategy, source: BatchSource, batch_size: int, split: str,
              saved: dict[str, dict[str, torch.Tensor]], into: dict[str, dict[str, torch.Tensor]]) -> BatchSource:
    """``source`` with the anchors of its samples added to its batches: the model's
    (:meth:`~clbench.models.base.ContinualModel.anchors`) and the strategy's (:meth:`Strategy.anchors`), those in
    ``saved[split]`` (a resumed experience), else computed now over its batches in order (of ``batch_size``), in
    eval mode without gradients; recorded in ``into[split]`` for the checkpoint. Only dict batches (text) can have
    anchors."""
    if not (isinstance(source, TensorBatchSource) and isinstance(source.data, dict)):
        return source
    fields = saved.get(split)
    if fields is None:
        module, own = ctx.module, strategy.overrides("anchors")
        training = module.training
        module.eval()
        try:
            with torch.no_grad():
                parts = [module.anchors(batch) | (strategy.anchors(ctx, batch) if own else {})
                         for batch in source.batches(batch_size, shuffle=False)]
        finally:
            module.train(training)
        fields = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]} if parts and parts[0] else {}
    if not fields:
        return source
    into[split] = fields
    return source.with_fields(**{k: v.to(source.device) for k, v in fields.items()})


def _close_failed(tracker: Tracker, error: BaseException) -> None:
    """Mark the run FAILED (an exception, whose first line becomes its ``error`` tag) or KILLED (an interrupt, or
    a signal that stopped it: :class:`clbench.preemption.Stopped`, tagged ``clbench.stopped``; it continues later);
    the metrics it logged stay. A store that fails now too is only logged: ``error`` is what the caller sees.
    When the store itself failed (a :class:`TrackingError` mid-run) the run is left RUNNING without trying again
    (that would be minutes of MLflow's retries): ``resume=true`` continues it."""
    if isinstance(error, TrackingError):
        return
    try:
        if isinstance(error, Exception):
            tracker.set_tags({"error": (str(error).strip().splitlines() or [type(error).__name__])[0][:1000]})
        elif isinstance(error, preemption.Stopped):
            tracker.set_tags({"clbench.stopped": str(error)[:1000]})
        tracker.finish("FAILED" if isinstance(error, Exception) else "KILLED")
    except Exception as also:  # e.g. the tracking server went away: keep the original error
        log.warning("could not mark MLflow run %s as failed: %s", tracker.run_id, also)


def _finish_print(cfg: RunConfig, R: np.ndarray, b: np.ndarray, run_id: str, others: dict[str, np.ndarray],
                  primary: str, per_sample: list[str]) -> RunResult:
    scores = metrics.summary(R, b)
    print(f"\n== {run_name(cfg)}  (MLflow run {run_id})")
    print(f"{primary} matrix R (%), row i = after experience i, column j = test experience j:")
    print(format_matrix(R))
    print("  ".join(f"{k.upper() if k != 'forgetting' else 'forgetting'} {v:.2f}" for k, v in scores.items()))
    return RunResult(R=R, initial=b, scores=scores, run_id=run_id, others=others, per_sample=per_sample)

