"""The measurements of the evaluation conditions of `conf/eval`: one Measurement per condition,
per-example.

A condition's `kind` is an entry of `benchmark.conditions.CONDITIONS`, which checks its config,
describes its row and names its measurement here: a function `(Context, cfg) -> scores`.
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyautoattack
import skimage.util
import torch
from pyautoattack.state import EvaluationState
from torch import Tensor, nn

from benchmark import distributed
from benchmark.attacks import eval_mode
from benchmark.conditions import CONDITIONS, check_conditions, condition_columns, eps_grid
from benchmark.errors import RFTBenchError
from benchmark.registry import resolve

log = logging.getLogger(__name__)

MIN_CORRUPTION_SIDE = 32  # imagecorruptions refuses smaller images


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
class NativeImages:
    """The test split at its native resolution, for a condition that changes images before the
    test transform (corruptions as the published study applied them). `images()` loads them:
    uint8 HWC RGB arrays in test order; `to_input` is the test transform, from such images to
    model inputs like `Context.x` (float32 NCHW in [0, 1] at the model's input size)."""

    images: Callable[[], list[np.ndarray]]
    to_input: Callable[[list[np.ndarray]], Tensor]


@dataclass(frozen=True)
class Context:
    """What every condition gets: the model (in eval mode), one evaluation batch of the test
    split on the CPU (`x`, `y`: test examples `first` to `first + len(y)` of `n_test`; batch
    number `batch`), where the model runs, where resumable state goes, the batch size, and the
    test split at its native resolution where the caller has it."""

    model: nn.Module
    x: Tensor
    y: Tensor
    device: torch.device
    work_dir: Path
    batch_size: int
    condition: str
    native: NativeImages | None = None
    batch: int = 0
    first: int = 0
    n_test: int | None = None  # None: x is the whole test split

    @property
    def test_size(self) -> int:
        return len(self.y) if self.n_test is None else self.n_test

    def predict(self, x: Tensor) -> Tensor:
        """Predicted labels (on the CPU) of the CPU images `x`, batch by batch."""
        with torch.no_grad():
            return torch.cat([self.model(batch.to(self.device)).argmax(1).cpu()
                              for batch in x.split(self.batch_size)])


# A kind's measurement: the per-example scores of the context's batch, in test order (bool when
# an example is simply correct or not). Its description (the Measurement fields norm to
# attack_version) comes from its CONDITIONS entry.
Measure = Callable[[Context, dict[str, Any]], Tensor]


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eval_cfg: dict[str, dict[str, Any]], work_dir: Path, *,
             batch_size: int = 250, native: NativeImages | None = None,
             group: distributed.Group = distributed.SINGLE,
             on_condition: Callable[[str, int, int], None] | None = None) -> list[Measurement]:
    """Measure every condition of `eval_cfg` (condition name -> config), in its order, with the
    model in eval mode (its flags are restored afterwards). `x`, `y` are the whole test split on
    the CPU; batches move to the model's device. `native`: the same split at its native
    resolution (needed by corruptions at resolution native). AutoAttack state goes under
    `work_dir/aa_state` so an interrupted evaluation resumes.

    Each condition is measured batch by batch (`batch_size` test examples, each batch's random
    draws seeded by its index), so the ranks of `group` share the batches (rank r takes batches
    r, r + N, ...) and every rank gets the per-example results of all, in test order: the same
    whatever the number of ranks. `on_condition(name, conditions done, conditions)` is called as
    each condition begins (the worker's progress)."""
    check_conditions(eval_cfg)
    device = next(model.parameters()).device
    if native is not None:  # loaded once, by the first batch that needs it
        native = replace(native, images=functools.cache(native.images))
    measurements = []
    with eval_mode(model):
        for done, (condition, cfg) in enumerate(eval_cfg.items()):
            if on_condition:
                on_condition(condition, done, len(eval_cfg))
            start = time.perf_counter()
            kind = CONDITIONS[cfg["kind"]]
            batches = [(k, first) for k, first in enumerate(range(0, len(y), batch_size))]
            mine = {k: resolve(kind.measure)(Context(model, x[first:first + batch_size], y[first:first + batch_size],
                                                     device, Path(work_dir), batch_size, condition, native,
                                                     batch=k, first=first, n_test=len(y)), cfg)
                    for k, first in (batches[i] for i in group.shard(len(batches)))}
            everyone = group.gather(mine)
            scores = torch.cat([everyone[k] for k in range(len(batches))])
            version = importlib.metadata.version(kind.package) if kind.package else None
            description = {**condition_columns(cfg), "attack_version": version}
            score = scores.double().numpy()  # float64: a bool count's mean is then n_correct / n exactly
            measurement = Measurement(condition=condition, **description, n_examples=len(score),
                                      n_correct=int((score == 1).sum()), accuracy=float(score.mean()),
                                      correct=score == 1, score=score, seconds=time.perf_counter() - start)
            log.info("%s: %d/%d correct (%.1f s)", condition, measurement.n_correct, measurement.n_examples,
                     measurement.seconds)
            measurements.append(measurement)
    return measurements


def clean(ctx: Context, cfg: dict[str, Any]) -> Tensor:
    """Accuracy of the argmax prediction on the test images as they are."""
    return ctx.predict(ctx.x) == ctx.y


# --- AutoAttack ------------------------------------------------------------------------------
# pyautoattack 0.2.0 saves its state (per-example robust flags, attacks done, clean accuracy)
# to `state_path` while it runs, but cannot resume from it: the attack set is saved as a string
# that never equals the set it is compared with (ValueError), and a resumed run returns no
# adversarial labels (UnboundLocalError). So a fresh run is its own, and the resume is ours:
# the attacks not yet done run on the examples still robust, and their flags are merged into
# the state. Flags always come from a state file, so a resumed condition reports every example.
# Note that the state is saved at each batch but the list of attacks done lazily (at most once a
# minute), so a resume may repeat the last finished attack on its survivors.

def autoattack(ctx: Context, cfg: dict[str, Any]) -> Tensor:
    """AutoAttack (pyautoattack, Croce & Hein 2020) at cfg norm, eps, version, on the context's
    batch, seeded by cfg seed + the batch's index. With version "custom", cfg `attacks` lists the
    attacks (pyautoattack's defaults for each). Its state: `aa_state/<condition>/batch<k>.json`."""
    cfg = {**cfg, "seed": cfg["seed"] + ctx.batch}
    path = ctx.work_dir / "aa_state" / ctx.condition / f"batch{ctx.batch}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _resumable_state(path, ctx) if path.exists() else None
    if state is None:
        return _run_autoattack(ctx, cfg, ctx.x, ctx.y, path)
    return _resume_autoattack(ctx, cfg, state, path)


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

def expected_robustness(ctx: Context, cfg: dict[str, Any]) -> Tensor:
    """Expected robustness (Ngnawe et al., 2025): the mean robust accuracy over eps uniform in
    [0, cfg eps], by the trapezoid rule on the grid of `conditions.eps_grid` (eps = 0 is the clean
    accuracy). Every other budget is the cfg's AutoAttack (custom: APGD-CE) run on every example,
    resumable as its own condition `<condition>@<k>`. An example's score is the trapezoid mean
    of its correctness over the grid, so the scores' mean is the trapezoid mean of the curve."""
    grid = eps_grid(cfg)
    attack_cfg = {key: value for key, value in cfg.items() if key != "grid_step"}
    curve = [ctx.predict(ctx.x) == ctx.y]
    for k, eps in enumerate(grid[1:], start=1):
        at_eps = replace(ctx, condition=f"{ctx.condition}@{k}")
        curve.append(autoattack(at_eps, {**attack_cfg, "kind": "autoattack", "eps": eps}))
    log.info("%s, batch %d: accuracy at eps = k/%d of %g, k = 0..%d: %s", ctx.condition, ctx.batch, len(grid) - 1,
             grid[-1], len(grid) - 1, " ".join(f"{float(correct.double().mean()):.3f}" for correct in curve))
    return trapezoid_scores(torch.stack(curve))


def trapezoid_scores(correct: Tensor) -> Tensor:
    """Per example (columns), the trapezoid mean over an evenly spaced grid (rows) of its
    correctness: (c_0 + 2 c_1 + ... + 2 c_{M-1} + c_M) / 2M, in integers until the division so
    an example correct everywhere scores exactly 1."""
    weights = torch.full((len(correct),), 2, dtype=torch.int64)
    weights[[0, -1]] = 1
    return (weights @ correct.long()).double() / (2 * (len(correct) - 1))


# --- common corruptions ----------------------------------------------------------------------

def corruptions(ctx: Context, cfg: dict[str, Any]) -> Tensor:
    """Accuracy on the test images corrupted one corruption per image (see `corrupted_inputs`)."""
    return torch.cat([ctx.predict(batch) for batch in corrupted_inputs(ctx, cfg)]) == ctx.y


def corrupted_inputs(ctx: Context, cfg: dict[str, Any]) -> Iterator[Tensor]:
    """The corrupted test split as model inputs, batch by batch in test order. Example i gets
    corruption `corruption_plan(n, ...)[i]` at cfg severity, seeded by (cfg seed, i) (see
    `corrupt_images`). At cfg resolution `native` (the published study) the native-resolution
    image is corrupted and then goes through the test transform; at `input`, the model's input
    image `ctx.x[i]` is corrupted."""
    plan = corruption_plan(ctx.test_size, cfg["corruptions"], cfg["assignment"])
    images, to_input = _corruption_source(ctx, cfg["resolution"])
    for start in range(0, len(ctx.y), ctx.batch_size):
        stop = min(start + ctx.batch_size, len(ctx.y))
        first = ctx.first + start  # test index of x[start]
        yield to_input(corrupt_images(images(start, stop), first, plan[first:ctx.first + stop], cfg["severity"],
                                      cfg["seed"]))


def corruption_plan(n: int, names: Sequence[str], assignment: str) -> list[str]:
    """The corruption of each of `n` test examples, in test order. `blocks` (the published
    study): contiguous blocks of floor(n / len(names)) examples per corruption, in the list's
    order, the remainder wrapping round to the first names (blocks of 1 when n < len(names));
    `round_robin`: names[i % len(names)]."""
    block = max(1, n // len(names)) if assignment == "blocks" else 1
    return [names[(i // block) % len(names)] for i in range(n)]


def _corruption_source(ctx: Context, resolution: str) -> tuple[Callable[[int, int], list[np.ndarray]],
                                                                Callable[[list[np.ndarray]], Tensor]]:
    """The images to corrupt (the context's examples start to stop, uint8 HWC) and the transform
    from corrupted images to model inputs, at `resolution`."""
    if resolution == "input":
        return lambda start, stop: _uint8_images(ctx.x[start:stop]), _float_images
    if ctx.native is None:
        raise RFTBenchError(f"condition {ctx.condition}: corruptions at resolution native need the test images at "
                            f"their native resolution, and this evaluation was given none")
    native = ctx.native.images()
    if len(native) != ctx.test_size:
        raise ValueError(f"{len(native)} native-resolution test images for a test split of {ctx.test_size}")
    smallest = min(min(image.shape[:2]) for image in native)
    if smallest < MIN_CORRUPTION_SIDE:
        raise RFTBenchError(
            f"condition {ctx.condition}: the corruptions need images of at least {MIN_CORRUPTION_SIDE}x"
            f"{MIN_CORRUPTION_SIDE} pixels, and the smallest native test image has a side of {smallest} pixels; "
            f"corrupt the model's input instead (eval.{ctx.condition}.resolution=input)")
    return lambda start, stop: native[ctx.first + start:ctx.first + stop], ctx.native.to_input


def _uint8_images(x: Tensor) -> list[np.ndarray]:
    """Float NCHW [0, 1] images as uint8 HWC arrays (imagecorruptions' format)."""
    return list((x.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy())


def _float_images(images: list[np.ndarray]) -> Tensor:
    """uint8 HWC arrays of one size as float NCHW [0, 1] images."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)


def corrupt_images(images: Sequence[np.ndarray], first_index: int, names: Sequence[str], severity: int,
                   seed: int) -> list[np.ndarray]:
    """Corrupted copies of the uint8 HWC images `images` (at least 32x32 pixels), image k being
    test example i = first_index + k: it gets corruption names[k] at `severity`, its randomness
    seeded by (seed, i) alone, so each example's corruption is the same on every run whatever
    the batching.

    imagecorruptions draws from numpy's global RNG, so it is seeded per image with
    seed * 1_000_003 + i; the caller's global numpy RNG state is restored afterwards. Its
    impulse_noise is the exception: see `_impulse_noise`.
    """
    corrupt = _imagecorruptions()
    rng_state = np.random.get_state()
    try:
        out = []
        for offset, (image, name) in enumerate(zip(images, names, strict=True)):
            image_seed = (seed * 1_000_003 + first_index + offset) % 2**32
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
    return out


def _impulse_noise(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """imagecorruptions' impulse_noise with a seeded generator. The package calls scikit-image's
    `random_noise` without one, which then draws from a fresh, OS-seeded generator (numpy's
    global seed does not reach it): the corrupted images would differ on every run."""
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]  # the package's table
    noisy = skimage.util.random_noise(image / 255.0, mode="s&p", amount=amount, rng=seed)
    return np.uint8(np.clip(noisy, 0, 1) * 255)  # the package's conversion (truncating)


def _imagecorruptions() -> Callable[..., np.ndarray]:
    """imagecorruptions' `corrupt`. Imported here: it is slow to import, and it warns that it
    imports pkg_resources (it needs setuptools<81)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from imagecorruptions import corrupt
    return corrupt
