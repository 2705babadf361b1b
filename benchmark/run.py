"""The worker: run one cell from its directory. Load data, load the pretrained backbone, train
with the cell's loss and protocol, evaluate every condition, write the rows.

The worker needs only the cell directory (its config.yaml) and the runtime (roots, device): it
knows nothing of studies or launchers, so any launcher (local, SLURM) can call it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import torch

from benchmark import cell as cells
from benchmark import (
    data,
    distributed,
    evaluate,
    history,
    models,
    results,
    retention,
    train,
)
from benchmark.provenance import JobRecord, provenance
from benchmark.validation import robust_validation, validation_subset

log = logging.getLogger("benchmark")


@dataclass(frozen=True)
class Runtime:
    """Where and how a cell runs; not part of the cell's identity."""

    data_root: Path
    weights_root: Path
    device: str = "auto"
    num_workers: int | str = 0  # DataLoader workers, or "auto" (see `loader_workers`)
    eval_batch_size: int = 250
    collective_timeout_s: float = 1800.0  # ranks of one cell: a collective waiting longer fails the cell
    retention: str = "final"  # what a done cell keeps (benchmark.retention)
    history_validation_size: int = 512  # images of the per-epoch robust validation (benchmark.history); 0: none

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Runtime:
        paths, runtime = config["paths"], config["runtime"]
        return cls(Path(paths["data"]).resolve(), Path(paths["weights"]).resolve(), runtime["device"],
                   runtime["num_workers"], runtime["eval_batch_size"], runtime["collective_timeout_s"],
                   runtime["retention"], runtime["history_validation_size"])

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


MAX_AUTO_WORKERS = 8  # beyond this a loader of 224-px images gains little and each worker costs memory


def loader_workers(setting: int | str, device: torch.device, cpus: int | None = None) -> int:
    """DataLoader workers for `runtime.num_workers`: a number as given; `auto` = on CUDA, the
    job's CPUs (`cpus`, from the launcher's job record, else this process's CPU affinity) minus one
    for the training process, at most MAX_AUTO_WORKERS, so per-image augmentation keeps up with the
    GPU; on the CPU 0, since the training threads already use every allocated core."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    allocated = cpus or len(os.sched_getaffinity(0))
    return max(0, min(MAX_AUTO_WORKERS, allocated - 1))


def run_cell(cell_dir: Path, runtime: Runtime, job: JobRecord | None = None) -> None:
    """Train and evaluate the cell in `cell_dir`. Its rows appear only when everything succeeded;
    on failure the state says why (with the traceback) and the exception propagates.

    `job`: what the launcher knows of the job running this (its launcher, id, log, CPUs), recorded
    in every state the worker writes, so `status` can ask the launcher about a worker that died
    silently.

    A cell run by N processes (torch.distributed's environment variables, set by the launcher:
    benchmark.distributed) calls this in every one of them. Rank 0 alone writes the state,
    heartbeat, log, checkpoint and rows; another rank that fails leaves its reason for rank 0,
    which fails the cell with it (the rank that failed first is named).
    """
    document = cells.read_config(cell_dir)
    group = distributed.from_environment()
    distributed.clear_failure(cell_dir, group)
    details = {**(job or {}), "requeues": _requeues(cells.read_state(cell_dir))}
    if group.writer:
        cells.write_state(cell_dir, "running", **details, host=os.uname().nodename, pid=os.getpid())
    started = datetime.now(timezone.utc)
    try:
        _use_allocated_cpus(details.get("cpus"))
        with _log_and_heartbeat(cell_dir, group):
            _train_and_evaluate(cell_dir, document, runtime, started, group, details.get("cpus"))
    except BaseException as err:
        if not group.writer:
            distributed.record_failure(cell_dir, group, err)
        elif not _interrupted_for_requeue(cell_dir, err):
            peer = distributed.peer_failure(cell_dir, group)
            reason, trace = ((f"rank {peer['rank']}: {peer['reason']}", peer["traceback"]) if peer
                             else (f"{type(err).__name__}: {err}", traceback.format_exc()))
            cells.write_state(cell_dir, "failed", **details, reason=reason, traceback=trace)
        raise
    finally:
        group.close()
    if group.writer:
        cells.write_state(cell_dir, "done", **details)


def _requeues(state: dict[str, Any]) -> int:
    """Requeues of the current submission: counted by the launcher from its `submitted` record on
    (`requeued` records), so a resubmitted cell starts again from 0."""
    return state.get("requeues", 0) if state["state"] in ("submitted", "requeued") else 0


def _interrupted_for_requeue(cell_dir: Path, err: BaseException) -> bool:
    """A launcher that requeues the cell on a time limit or preemption records `requeued` and then
    exits the process (SystemExit): that is no failure, and the record must stay."""
    return isinstance(err, SystemExit) and cells.read_state(cell_dir)["state"] == "requeued"


def _use_allocated_cpus(cpus: int | None) -> None:
    """As many torch threads as CPUs the scheduler gave the job (torch would take every core of
    the node, oversubscribing it when several cells share a node)."""
    if cpus:
        torch.set_num_threads(cpus)


def _train_and_evaluate(cell_dir: Path, document: dict, runtime: Runtime, started: datetime,
                        group: distributed.Group, cpus: int | None) -> None:
    config = document["config"]
    device = distributed.rank_device(runtime.torch_device(), group)
    distributed.connect(group, device, runtime.collective_timeout_s)
    log.info("rank %d of %d", group.rank, group.world_size)
    log.info("cell %s (%s) on %s, %d torch threads", document["cell_id"], document["slug"], device,
             torch.get_num_threads())
    train.seed_everything(config["seed"])
    splits = data.load_splits(config["dataset"], runtime.data_root)
    model = models.create_model(config["model"], splits.num_classes, runtime.weights_root)
    trainer = train.Trainer(model, splits, config["loss"], config["protocol"], ckpt_path=cell_dir / "ckpt" / "last.pt",
                            device=device, seed=config["seed"],
                            num_workers=loader_workers(runtime.num_workers, device, cpus), group=group,
                            **_history_hooks(cell_dir, document, model, splits, device, runtime, group))
    if group.writer:
        cells.write_progress(cell_dir, phase="training", epochs=config["protocol"]["epochs"])
    trained = trainer.fit()
    x_test, y_test = data.load_tensors(splits.test)
    native = native_images(config["dataset"], runtime)
    group.broadcast_state(model)  # every rank evaluates the checkpointed model (rank 0's BatchNorm statistics)
    measurements = evaluate.evaluate(model, x_test, y_test, config["eval"], cell_dir,
                                     batch_size=runtime.eval_batch_size, native=native, group=group,
                                     on_condition=_evaluation_progress(cell_dir, group))
    if not group.writer:
        return
    state = cells.read_state(cell_dir)
    common = {
        "schema_version": results.SCHEMA_VERSION,
        "study": document["study"], "cell_id": document["cell_id"], "seed": config["seed"],
        **{axis: config[axis]["name"] for axis in cells.AXES},
        "attempt": state.get("attempt", 1), "requeues": state.get("requeues", 0),
        "source": "run", "source_file": None, **provenance(str(device), state.get("job_id")),
        "started_at": started, "finished_at": datetime.now(timezone.utc), "train_seconds": trained.seconds,
        "precision": trainer.precision, "world_size": group.world_size,
    }
    rows = [{**common, **measurement_columns(m)} for m in measurements]
    results.write_table(cell_dir / cells.EXAMPLES_FILE, examples_table(measurements))
    results.write_rows(cell_dir / cells.ROWS_FILE, rows)  # last: its existence means "done"
    log.info("wrote %d rows: %s", len(rows), ", ".join(f"{m.condition}={m.n_correct}/{m.n_examples}" for m in measurements))
    retention.keep_weights(cell_dir, runtime.retention, model.state_dict())


def _history_hooks(cell_dir: Path, document: dict, model: models.Classifier, splits: data.Splits,
                   device: torch.device, runtime: Runtime, group: distributed.Group) -> dict[str, Any]:
    """The Trainer's `measure` (the robust validation of benchmark.validation on a small fixed
    subset) and `on_epoch_end` (the cell's history file rewritten whole) for the writing rank;
    nothing for the others."""
    if not group.writer:
        return {}
    attack = document["config"]["loss"]["attack"]
    x_val, y_val = (validation_subset(splits.val, runtime.history_validation_size)
                    if runtime.history_validation_size else (None, None))

    def measure() -> dict[str, Any]:
        measured: dict[str, Any] = {"val_size": len(splits.val)}
        if x_val is not None:
            start = time.perf_counter()
            # Its own random stream: measuring (an attack's random starts) must not change training.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                loss, accuracy = robust_validation(model, x_val, y_val, attack, device, runtime.eval_batch_size)
            measured |= {"val_robust_loss": loss, "val_robust_accuracy": accuracy, "val_robust_size": len(y_val),
                         "val_seconds": time.perf_counter() - start}
        return measured

    def write(done: int, trained: train.TrainResult) -> None:
        history.write_history(cell_dir, document["study"], document["cell_id"], trained.history)
        cells.write_progress(cell_dir, phase="training", epochs_done=done, epochs=trained.epochs)

    return {"measure": measure, "on_epoch_end": write}


def _evaluation_progress(cell_dir: Path, group: distributed.Group) -> Callable[[str, int, int], None] | None:
    """evaluate's `on_condition` for the writing rank: the condition begun, in the heartbeat."""
    if not group.writer:
        return None
    return lambda condition, done, total: cells.write_progress(cell_dir, phase="evaluating", condition=condition,
                                                               conditions_done=done, conditions=total)


def native_images(dataset_cfg: dict[str, Any], runtime: Runtime) -> evaluate.NativeImages:
    """The test split at its native resolution, read only by a condition that needs it."""
    return evaluate.NativeImages(images=lambda: data.load_test_native(dataset_cfg, runtime.data_root),
                                 to_input=lambda images: data.test_input(images, dataset_cfg))


def measurement_columns(m: evaluate.Measurement) -> dict[str, Any]:
    """The row columns of one measurement (the rest of a row says which cell and run)."""
    return {
        "condition": m.condition, "norm": m.norm, "epsilon": m.epsilon, "eps_grid": m.eps_grid,
        "attack": m.attack, "attack_version": m.attack_version, "n_examples": m.n_examples,
        "n_correct": m.n_correct, "accuracy": m.accuracy, "eval_seconds": m.seconds,
    }


def examples_table(measurements: list[evaluate.Measurement]) -> pa.Table:
    """Per-example results, one row per condition x test example (for bootstrap CIs): whether
    it is correct, and its score (its share of the accuracy, see `evaluate.Measurement`)."""
    return pa.table({
        "condition": [m.condition for m in measurements for _ in m.correct],
        "index": [i for m in measurements for i in range(len(m.correct))],
        "correct": [bool(c) for m in measurements for c in m.correct],
        "score": [float(v) for m in measurements for v in m.score],
    })


@contextmanager
def _cell_log(cell_dir: Path) -> Iterator[None]:
    """Send the benchmark's log records to the cell's train.log while the cell runs."""
    handler = logging.FileHandler(cell_dir / cells.LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


@contextmanager
def _log_and_heartbeat(cell_dir: Path, group: distributed.Group) -> Iterator[None]:
    """The cell's log and heartbeat, kept by rank 0 only."""
    if not group.writer:
        yield
        return
    with _cell_log(cell_dir), _heartbeat(cell_dir):
        yield


@contextmanager
def _heartbeat(cell_dir: Path) -> Iterator[None]:
    """Touch the heartbeat file every HEARTBEAT_SECONDS, so a status check can tell a live worker from a
    dead one whose state still says running."""
    stop = threading.Event()
    beat = cell_dir / cells.HEARTBEAT_FILE

    def loop() -> None:
        while True:
            beat.touch()
            if stop.wait(cells.HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=loop, daemon=True, name="heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
