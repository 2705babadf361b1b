"""The evaluation conditions of `conf/eval`: one Measurement per condition, per-example.

A condition's `kind` selects a function in KINDS; a new kind is one more function
`(Context, cfg) -> (scores, description)` registered there.
"""
from __future__ import annotations

import importlib.metadata
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyautoattack
import skimage.util
import torch
from pyautoattack.state import EvaluationState
from torch import Tensor, nn

from benchmark.attacks import eval_mode
from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.results import condition_columns, eps_grid

log = logging.getLogger(__name__)

AUTOATTACK_NORMS = ("Linf", "L2", "L1")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")


@dataclass(kw_only=True)
class Measurement:
    """One condition measured on the whole test split. The fields from norm to attack_version
    describe the condition; those that do not apply are None.

    `score` is each example's share of the accuracy, in test order: 1 or 0 (correct or not), or
    for expected robustness the share of its eps grid at which it is correct (trapezoid weights).
    `accuracy` is its mean; `correct` (and `n_correct`) the examples of score 1."""

    condition: str
    norm: str | None = None
    epsilon: float | None = None
    eps_grid: list[float] | None = None
    attack: str | None = None
    attack_version: str | None = None  # version of the package that ran the attack
    n_examples: int
    n_correct: int
    accuracy: float
    correct: np.ndarray
    score: np.ndarray
    seconds: float


@dataclass(frozen=True)
class Context:
    """What every condition gets: the model (in eval mode), the test split on the CPU, where the
    model runs, where resumable state goes, and the batch size."""

    model: nn.Module
    x: Tensor
    y: Tensor
    device: torch.device
    work_dir: Path
    batch_size: int
    condition: str

    def predict(self, x: Tensor) -> Tensor:
        """Predicted labels (on the CPU) of the CPU images `x`, batch by batch."""
        with torch.no_grad():
            return torch.cat([self.model(batch.to(self.device)).argmax(1).cpu()
                              for batch in x.split(self.batch_size)])


# A kind returns the per-example scores (test order; bool when an example is simply correct or
# not) and its description: the Measurement fields norm, epsilon, eps_grid, attack,
# attack_version that apply to it.
Kind = Callable[[Context, dict[str, Any]], tuple[Tensor, dict[str, Any]]]


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eval_cfg: dict[str, dict[str, Any]], work_dir: Path, *,
             batch_size: int = 250) -> list[Measurement]:
    """Measure every condition of `eval_cfg` (condition name -> config), in its order, with the
    model in eval mode (its flags are restored afterwards). `x`, `y` are the whole test split on
    the CPU; batches move to the model's device. AutoAttack state goes under `work_dir/aa_state`
    so an interrupted evaluation resumes."""
    check_conditions(eval_cfg)
    device = next(model.parameters()).device
    measurements = []
    with eval_mode(model):
        for condition, cfg in eval_cfg.items():
            start = time.perf_counter()
            context = Context(model, x, y, device, Path(work_dir), batch_size, condition)
            scores, description = KINDS[cfg["kind"]](context, cfg)
            score = scores.double().numpy()  # float64: a bool count's mean is then n_correct / n exactly
            measurement = Measurement(condition=condition, **description, n_examples=len(score),
                                      n_correct=int((score == 1).sum()), accuracy=float(score.mean()),
                                      correct=score == 1, score=score, seconds=time.perf_counter() - start)
            log.info("%s: %d/%d correct (%.1f s)", condition, measurement.n_correct, measurement.n_examples,
                     measurement.seconds)
            measurements.append(measurement)
    return measurements


def check_conditions(eval_cfg: dict[str, dict[str, Any]]) -> None:
    """Refuse a condition that could not run (unknown kind, norm, version, corruption; a bad
    eps grid), naming it: `evaluate` checks all before measuring any, a launch before submitting."""
    for condition, cfg in eval_cfg.items():
        kind = cfg["kind"]
        if kind not in KINDS:
            raise unknown_choice(f"eval kind (condition {condition})", kind, KINDS)
        if kind in ("autoattack", "expected"):
            _check_autoattack(condition, cfg)
        if kind == "expected":
            eps_grid(cfg)
        if kind == "corruptions":
            _imagecorruptions(cfg["corruptions"], cfg["severity"])


def clean(ctx: Context, cfg: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Accuracy of the argmax prediction on the test images as they are."""
    return ctx.predict(ctx.x) == ctx.y, {}


# --- AutoAttack ------------------------------------------------------------------------------
# pyautoattack 0.2.0 saves its state (per-example robust flags, attacks done, clean accuracy)
# to `state_path` while it runs, but cannot resume from it: the attack set is saved as a string
# that never equals the set it is compared with (ValueError), and a resumed run returns no
# adversarial labels (UnboundLocalError). So a fresh run is its own, and the resume is ours:
# the attacks not yet done run on the examples still robust, and their flags are merged into
# the state. Flags always come from a state file, so a resumed condition reports every example.
# Note that the state is saved at each batch but the list of attacks done lazily (at most once a
# minute), so a resume may repeat the last finished attack on its survivors.

def autoattack(ctx: Context, cfg: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """AutoAttack (pyautoattack, Croce & Hein 2020) at cfg norm, eps, version, seed. With
    version "custom", cfg `attacks` lists the attacks (pyautoattack's defaults for each)."""
    path = ctx.work_dir / "aa_state" / f"{ctx.condition}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _resumable_state(path, ctx) if path.exists() else None
    if state is None:
        robust = _run_autoattack(ctx, cfg, ctx.x, ctx.y, path)
    else:
        robust = _resume_autoattack(ctx, cfg, state, path)
    description = {**condition_columns(cfg), "epsilon": float(cfg["eps"]), "attack_version": pyautoattack.__version__}
    return robust, description


def _check_autoattack(condition: str, cfg: dict[str, Any]) -> None:
    if cfg["norm"] not in AUTOATTACK_NORMS:
        raise unknown_choice(f"AutoAttack norm (condition {condition})", cfg["norm"], AUTOATTACK_NORMS)
    if cfg["version"] not in AUTOATTACK_VERSIONS:
        raise unknown_choice(f"AutoAttack version (condition {condition})", cfg["version"], AUTOATTACK_VERSIONS)
    if (cfg["version"] == "custom") != bool(cfg.get("attacks")):
        raise RFTBenchError(f"condition {condition}: AutoAttack takes a list of `attacks` with version "
                            f"custom, and only then (got version {cfg['version']!r}, attacks {cfg.get('attacks')!r})")


def _new_autoattack(ctx: Context, cfg: dict[str, Any]) -> pyautoattack.AutoAttack:
    adversary = pyautoattack.AutoAttack(ctx.model, norm=cfg["norm"], eps=cfg["eps"], version=cfg["version"],
                                        attacks=cfg.get("attacks"), device=ctx.device, seed=cfg["seed"])
    if cfg["version"] == "custom":  # a cheaper budget, e.g. for the CPU demo; standard is fixed
        for attack in (adversary.apgd, adversary.apgd_targeted):
            attack.n_iter = cfg.get("n_iter", attack.n_iter)
            attack.n_restarts = cfg.get("n_restarts", attack.n_restarts)
    # Its records (debug progress, warnings of its sanity checks) go to our log, not stderr.
    adversary.logger = adversary.apgd.logger = adversary.apgd_targeted.logger = log.getChild("autoattack")
    return adversary


def _run_autoattack(ctx: Context, cfg: dict[str, Any], x: Tensor, y: Tensor, path: Path,
                    attacks: list[str] | None = None) -> Tensor:
    """A fresh AutoAttack run on (x, y) saving its state to `path`; the robust flags read back
    from that state. `attacks` restricts the version's attacks (keeping its hyperparameters)."""
    path.unlink(missing_ok=True)
    adversary = _new_autoattack(ctx, cfg)
    if attacks is not None:
        adversary.attacks_to_run = attacks
    # Its own checks (e.g. for a randomised model, whose flags could not be trusted) log warnings.
    adversary.run_standard_evaluation(x, y, batch_size=ctx.batch_size, state_path=path)
    return _load_state(path).robust_flags


def _resume_autoattack(ctx: Context, cfg: dict[str, Any], state: EvaluationState, path: Path) -> Tensor:
    """Finish an interrupted run: the attacks not done yet, on the examples still robust; then
    save the state of a finished run in its place."""
    attacks = _new_autoattack(ctx, cfg).attacks_to_run
    remaining = [a for a in attacks if a not in state.run_attacks]
    robust = state.robust_flags.clone()
    still = robust.nonzero().squeeze(1)
    log.info("%s: resuming AutoAttack from %s: %d robust examples, attacks left: %s",
             ctx.condition, path, len(still), ", ".join(remaining) or "none")
    if not remaining:
        return robust
    if len(still):
        part = path.with_suffix(".resume.json")
        robust[still] = _run_autoattack(ctx, cfg, ctx.x[still], ctx.y[still], part, attacks=remaining)
        part.unlink()
    finished = EvaluationState(set(attacks), path=path)  # a loaded state cannot record attacks
    finished.robust_flags, finished.clean_accuracy = robust, state.clean_accuracy
    for attack in attacks:
        finished.add_run_attack(attack)
    finished.to_disk(force=True)
    return robust


def _load_state(path: Path) -> EvaluationState:
    with warnings.catch_warnings():  # it warns when the results folder has moved since
        warnings.simplefilter("ignore", UserWarning)
        return EvaluationState.from_disk(path)


def _resumable_state(path: Path, ctx: Context) -> EvaluationState | None:
    """The state at `path` if it belongs to this model and data, else None (cut short mid-write,
    or left by another model: its clean accuracy or flags do not fit)."""
    try:
        state = _load_state(path)
    except (ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the unreadable AutoAttack state %s (%s: %s)", path, type(err).__name__, err)
        return None
    robust, clean_correct = state.robust_flags, ctx.predict(ctx.x) == ctx.y
    n = len(clean_correct)
    if (robust.shape != clean_correct.shape or state.clean_accuracy != int(clean_correct.sum()) / n
            or bool((robust & ~clean_correct).any())):
        log.warning("ignoring the AutoAttack state %s: it does not match this model's clean predictions", path)
        return None
    return state


# --- expected robustness ---------------------------------------------------------------------

def expected_robustness(ctx: Context, cfg: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Expected robustness (Ngnawe et al., 2025): the mean robust accuracy over eps uniform in
    [0, cfg eps], by the trapezoid rule on the grid of `results.eps_grid` (eps = 0 is the clean
    accuracy). Every other budget is the cfg's AutoAttack (custom: APGD-CE) run on every example,
    resumable as its own condition `<condition>@<k>`. An example's score is the trapezoid mean
    of its correctness over the grid, so the scores' mean is the trapezoid mean of the curve."""
    grid = eps_grid(cfg)
    attack_cfg = {key: value for key, value in cfg.items() if key != "grid_step"}
    curve = [ctx.predict(ctx.x) == ctx.y]
    for k, eps in enumerate(grid[1:], start=1):
        at_eps = replace(ctx, condition=f"{ctx.condition}@{k}")
        curve.append(autoattack(at_eps, {**attack_cfg, "kind": "autoattack", "eps": eps})[0])
    log.info("%s: accuracy at eps = k/%d of %g, k = 0..%d: %s", ctx.condition, len(grid) - 1, grid[-1],
             len(grid) - 1, " ".join(f"{float(correct.double().mean()):.3f}" for correct in curve))
    description = {**condition_columns(cfg), "attack_version": pyautoattack.__version__}
    return trapezoid_scores(torch.stack(curve)), description


def trapezoid_scores(correct: Tensor) -> Tensor:
    """Per example (columns), the trapezoid mean over an evenly spaced grid (rows) of its
    correctness: (c_0 + 2 c_1 + ... + 2 c_{M-1} + c_M) / 2M, in integers until the division so
    an example correct everywhere scores exactly 1."""
    weights = torch.full((len(correct),), 2, dtype=torch.int64)
    weights[[0, -1]] = 1
    return (weights @ correct.long()).double() / (2 * (len(correct) - 1))


# --- common corruptions ----------------------------------------------------------------------

def corruptions(ctx: Context, cfg: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Accuracy on the test images corrupted one corruption per image (see `corrupt_images`)."""
    predictions = torch.cat([
        ctx.predict(corrupt_images(batch, start, cfg["corruptions"], cfg["severity"], cfg["seed"]))
        for start, batch in zip(range(0, len(ctx.x), ctx.batch_size), ctx.x.split(ctx.batch_size))
    ])
    description = {"attack": f"corruptions-severity{cfg['severity']}",
                   "attack_version": importlib.metadata.version("imagecorruptions")}
    return predictions == ctx.y, description


def corrupt_images(x: Tensor, first_index: int, names: list[str], severity: int, seed: int) -> Tensor:
    """Corrupted copies of the float CHW [0, 1] images `x`, whose test indices start at
    `first_index`: image i gets corruption names[i % len(names)] at `severity`, its randomness
    seeded by (seed, i) alone, so each image's corruption is the same on every run whatever the
    batching. Images go through uint8 HWC (imagecorruptions' format; at least 32x32 pixels).

    imagecorruptions draws from numpy's global RNG, so it is seeded per image with
    seed * 1_000_003 + i; the caller's global numpy RNG state is restored afterwards. Its
    impulse_noise is the exception: see `_impulse_noise`.
    """
    corrupt = _imagecorruptions(names, severity)
    images = (x.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    rng_state = np.random.get_state()
    try:
        out = []
        for offset, image in enumerate(images):
            i = first_index + offset
            name, image_seed = names[i % len(names)], (seed * 1_000_003 + i) % 2**32
            np.random.seed(image_seed)
            if name == "impulse_noise":
                corrupted = _impulse_noise(image, severity, image_seed)
            else:
                corrupted = corrupt(image, corruption_name=name, severity=severity)
            if corrupted.shape != image.shape:  # not seen at 32-384 px for any severity
                raise RuntimeError(f"{name} changed an image's shape {image.shape} -> {corrupted.shape}")
            out.append(corrupted)
    finally:
        np.random.set_state(rng_state)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255)


def _impulse_noise(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """imagecorruptions' impulse_noise with a seeded generator. The package calls scikit-image's
    `random_noise` without one, which then draws from a fresh, OS-seeded generator (numpy's
    global seed does not reach it): the corrupted images would differ on every run."""
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]  # the package's table
    noisy = skimage.util.random_noise(image / 255.0, mode="s&p", amount=amount, rng=seed)
    return np.uint8(np.clip(noisy, 0, 1) * 255)  # the package's conversion (truncating)


def _imagecorruptions(names: list[str], severity: int) -> Callable[..., np.ndarray]:
    """imagecorruptions' `corrupt`, after checking the names and severity. Imported here: it is
    slow to import, and it warns that it imports pkg_resources (it needs setuptools<81)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from imagecorruptions import corrupt, get_corruption_names
    for name in names:
        if name not in get_corruption_names("all"):
            raise unknown_choice("corruption", name, get_corruption_names("all"))
    if severity not in (1, 2, 3, 4, 5):
        raise RFTBenchError(f"corruption severity must be an integer from 1 to 5, got {severity!r}")
    return corrupt


KINDS: dict[str, Kind] = {"clean": clean, "autoattack": autoattack, "expected": expected_robustness,
                          "corruptions": corruptions}
