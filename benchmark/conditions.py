"""The evaluation condition kinds of `conf/eval` (one `kind:` per condition), torch-free.

`CONDITIONS` maps a kind to everything about it: its config check (run before anything is
measured or launched), its row description (the norm, epsilon, eps_grid and attack columns, built
here once for the worker's rows and for imported ones), the package that runs it (its version goes
in the row), the typed schema of its keys, and its measurement, named by import path and resolved
only where the model runs. A new kind is one `CONDITIONS.register(...)` plus one `conf/eval` file;
its measurement is a function `(evaluate.Context, cfg) -> per-example scores` (see evaluate.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.registry import Registry

AUTOATTACK_NORMS = ("Linf", "L2", "L1")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
# imagecorruptions' get_corruption_names("all") (15 common + 4 validation corruptions), kept here so
# a config is checked without importing the package (slow, and it warns); a test keeps them equal.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
SEVERITIES = (1, 2, 3, 4, 5)
# Where an image is corrupted: at its native resolution before the test transform resizes it (the
# published study), or after, on the model's input.
RESOLUTIONS = ("native", "input")
# Which corruption each test example gets: contiguous blocks of floor(n / len(corruptions)) examples
# (the published study), or corruptions[i % len(corruptions)].
ASSIGNMENTS = ("blocks", "round_robin")
# The published study's way (conf/eval/common.yaml), for which a row's attack names nothing extra.
PUBLISHED_CORRUPTIONS = {"resolution": "native", "assignment": "blocks"}


class _Keys(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="forbid")


class CleanKeys(_Keys):
    """A clean condition has no key but its kind."""

    kind: Literal["clean"]


class AutoAttackKeys(_Keys):
    """AutoAttack (pyautoattack) at one budget."""

    kind: Literal["autoattack"]
    norm: Literal[AUTOATTACK_NORMS]
    eps: float = pydantic.Field(ge=0, description="the attack budget in the norm's units, pixels in [0, 1]")
    version: Literal[AUTOATTACK_VERSIONS] = pydantic.Field(description="pyautoattack's version of AutoAttack")
    attacks: list[str] | None = pydantic.Field(None, description="the attacks run by version custom, and only by it")
    n_iter: int | None = pydantic.Field(None, ge=1, description="version custom: APGD iterations")
    n_restarts: int | None = pydantic.Field(None, ge=1, description="version custom: APGD restarts")
    seed: int = pydantic.Field(ge=0)


class ExpectedKeys(AutoAttackKeys):
    """Expected robustness: AutoAttack at every budget of 0, grid_step, ..., eps."""

    kind: Literal["expected"]  # type: ignore[assignment]  # the same keys under another kind
    grid_step: float = pydantic.Field(gt=0, description="spacing of the eps grid; eps is a whole number of steps")


class CorruptionKeys(_Keys):
    """Common corruptions (imagecorruptions), one per test example."""

    kind: Literal["corruptions"]
    severity: int = pydantic.Field(ge=SEVERITIES[0], le=SEVERITIES[-1])
    seed: int = pydantic.Field(ge=0, description="with the example's index, seeds its corruption")
    corruptions: list[Literal[CORRUPTIONS]] = pydantic.Field(min_length=1)
    resolution: Literal[RESOLUTIONS] = pydantic.Field(description="corrupt at the native resolution, or the input's")
    assignment: Literal[ASSIGNMENTS] = pydantic.Field(description="which corruption each test example gets")


@dataclass(frozen=True)
class ConditionKind:
    """Everything about one kind of condition.

    `measure` is the import path of the measurement; `check(condition, cfg)` raises
    RFTBenchError for a config that could not run (None: nothing to check); `describe(cfg)` gives
    those of the row's norm, epsilon, eps_grid and attack that apply; `package` is the
    distribution whose version the row records as attack_version (None: no attack); `schema`
    types the condition node's keys, `kind` included (extra keys forbidden)."""

    measure: str
    check: Callable[[str, dict[str, Any]], None] | None = None
    describe: Callable[[dict[str, Any]], dict[str, Any]] = lambda cfg: {}
    package: str | None = None
    schema: type[pydantic.BaseModel] | None = None


CONDITIONS: Registry[ConditionKind] = Registry("eval kind")


def check_conditions(eval_cfg: dict[str, dict[str, Any]]) -> None:
    """Refuse a condition that could not run (unknown kind, norm, version, corruption; a bad eps
    grid), naming it: `evaluate` checks all before measuring any, a launch before submitting."""
    for condition, cfg in eval_cfg.items():
        kind = cfg["kind"]
        if kind not in CONDITIONS:
            raise unknown_choice(f"eval kind (condition {condition})", kind, CONDITIONS)
        check = CONDITIONS[kind].check
        if check is not None:
            check(condition, cfg)


def condition_columns(cfg: dict[str, Any]) -> dict[str, Any]:
    """The norm, epsilon, eps_grid and attack columns of a condition, from its `eval` config node."""
    return {"norm": None, "epsilon": None, "eps_grid": None, "attack": None, **CONDITIONS[cfg["kind"]].describe(cfg)}


def eps_grid(cfg: dict[str, Any]) -> list[float]:
    """The budgets of an expected-robustness condition: 0 to `eps` in steps of `grid_step`
    (e.g. 4/255 in steps of 1/255: 0, 1/255, ..., 4/255). `eps` must be a whole number of steps;
    the points are k * eps / M, so the last is `eps` exactly."""
    eps, step = float(cfg["eps"]), float(cfg["grid_step"])
    intervals = round(eps / step) if step > 0 else 0
    if eps <= 0 or intervals < 1 or abs(intervals * step - eps) > 1e-9 * eps:
        raise RFTBenchError(f"expected robustness needs eps > 0 that is a whole number of grid steps: got "
                            f"eps={eps!r}, grid_step={step!r} (e.g. eps=4/255, grid_step=1/255)")
    return [k * eps / intervals for k in range(intervals + 1)]


# --- clean -----------------------------------------------------------------------------------

CONDITIONS.register("clean", ConditionKind(measure="benchmark.evaluate:clean", schema=CleanKeys))


# --- AutoAttack and expected robustness --------------------------------------------------------

def _check_autoattack(condition: str, cfg: dict[str, Any]) -> None:
    if cfg["norm"] not in AUTOATTACK_NORMS:
        raise unknown_choice(f"AutoAttack norm (condition {condition})", cfg["norm"], AUTOATTACK_NORMS)
    if cfg["version"] not in AUTOATTACK_VERSIONS:
        raise unknown_choice(f"AutoAttack version (condition {condition})", cfg["version"], AUTOATTACK_VERSIONS)
    if (cfg["version"] == "custom") != bool(cfg.get("attacks")):
        raise RFTBenchError(f"condition {condition}: AutoAttack takes a list of `attacks` with version "
                            f"custom, and only then (got version {cfg['version']!r}, attacks {cfg.get('attacks')!r})")


def _check_expected(condition: str, cfg: dict[str, Any]) -> None:
    _check_autoattack(condition, cfg)
    eps_grid(cfg)


def _autoattack_name(cfg: dict[str, Any]) -> str:
    """e.g. autoattack-standard, or autoattack-custom(apgd-ce,n_iter=20,n_restarts=1)."""
    budget = "".join(f",{key}={cfg[key]}" for key in ("n_iter", "n_restarts") if key in cfg)
    attacks = f"({','.join(cfg['attacks'])}{budget})" if cfg.get("attacks") else ""
    return f"autoattack-{cfg['version']}{attacks}"


def _describe_autoattack(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"norm": cfg["norm"], "epsilon": float(cfg["eps"]), "attack": _autoattack_name(cfg)}


def _describe_expected(cfg: dict[str, Any]) -> dict[str, Any]:
    """Its AutoAttack runs at every budget of the grid; its epsilon is the grid's end."""
    return {**_describe_autoattack(cfg), "eps_grid": eps_grid(cfg), "attack": f"expected-{_autoattack_name(cfg)}"}


CONDITIONS.register("autoattack", ConditionKind(
    measure="benchmark.evaluate:autoattack", check=_check_autoattack, describe=_describe_autoattack,
    package="pyautoattack", schema=AutoAttackKeys))
CONDITIONS.register("expected", ConditionKind(
    measure="benchmark.evaluate:expected_robustness", check=_check_expected, describe=_describe_expected,
    package="pyautoattack", schema=ExpectedKeys))


# --- common corruptions ------------------------------------------------------------------------

def _check_corruptions(condition: str, cfg: dict[str, Any]) -> None:
    missing = [key for key in CorruptionKeys.model_fields if key not in cfg]
    if missing:  # e.g. the config of a cell planned before `resolution` and `assignment` existed
        raise RFTBenchError(f"condition {condition}: no {', '.join(missing)} in its config (conf/eval/common.yaml "
                            f"has them all); plan the cell again")
    for name in cfg["corruptions"]:
        if name not in CORRUPTIONS:
            raise unknown_choice(f"corruption (condition {condition})", name, CORRUPTIONS)
    if not cfg["corruptions"]:
        raise RFTBenchError(f"condition {condition}: the list of corruptions is empty")
    if cfg["severity"] not in SEVERITIES:
        raise RFTBenchError(f"condition {condition}: corruption severity must be an integer from 1 to 5, "
                            f"got {cfg['severity']!r}")
    for key, choices in (("resolution", RESOLUTIONS), ("assignment", ASSIGNMENTS)):
        if cfg[key] not in choices:
            raise unknown_choice(f"corruption {key} (condition {condition})", cfg[key], choices)


def _describe_corruptions(cfg: dict[str, Any]) -> dict[str, Any]:
    """e.g. corruptions-severity3; a departure from the published way is named in parentheses:
    corruptions-severity3(resolution=input). A config planned before these keys existed names
    none, as its rows did."""
    departures = [f"{key}={cfg[key]}" for key, published in PUBLISHED_CORRUPTIONS.items()
                  if cfg.get(key, published) != published]
    return {"attack": f"corruptions-severity{cfg['severity']}" + (f"({','.join(departures)})" if departures else "")}


CONDITIONS.register("corruptions", ConditionKind(
    measure="benchmark.evaluate:corruptions", check=_check_corruptions, describe=_describe_corruptions,
    package="imagecorruptions", schema=CorruptionKeys))
