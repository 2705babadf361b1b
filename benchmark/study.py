"""A study expanded into cells, fast: Hydra composes the root config once, then the grid is a
plain product over the axis options, each option's YAML loaded and patched once.

Composing each of the paper's 1,440 cells through Hydra would take tens of seconds; this takes
well under one. Every name is validated here, before anything is launched or written.

Overrides use Hydra's grammar. On an axis (dataset, model, loss, protocol) an override chooses
the axis' options and replaces the study's own: `dataset=caltech101,flowers102`,
`model='glob(vit_*)'`. A dotted key under an axis (`loss.trades_beta=6`) patches every option of
that axis. Everything else (`study=paper`, `seed=1`, `eval.linf.eps=0.03`, `launcher=slurm`)
goes to Hydra's composition as usual.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, Override, OverrideType
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from benchmark.cell import AXES, Cell
from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.paths import CONF_DIR

# Groups whose option is chosen on the command line (`group=option`), validated by name.
GROUPS = (*AXES, "eval", "study", "launcher")


@dataclass(frozen=True)
class Study:
    """A planned study: its resolved root config (paths, runtime, launcher, study) and cells."""

    name: str
    config: dict[str, Any]
    cells: list[Cell]

    @property
    def dir(self) -> Path:
        return Path(self.config["paths"]["results"]) / self.name


def options(group: str) -> list[str]:
    """The option names of a config group: its YAML files' names."""
    return sorted(p.name.removesuffix(".yaml") for p in (CONF_DIR / group).glob("*.yaml"))


@cache
def load_option(group: str, name: str) -> dict[str, Any]:
    """One option of a group as a plain dict (cached: planning reads each file once)."""
    if name not in options(group):
        raise unknown_choice(group, name, options(group))
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"), resolve=True)


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `base` with `patch` merged in recursively (neither is modified)."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def plan(overrides: Sequence[str] = ()) -> Study:
    """Expand the study chosen by `overrides` (default `study=demo`) into its cells."""
    axis_choices, axis_patches, hydra_overrides = _split(_parse(overrides))
    root = _compose(hydra_overrides)
    study = root["study"]
    axes = {axis: _choose(axis, axis_choices.get(axis), study["axes"][axis]) for axis in AXES}
    nodes = {
        axis: {name: _option_node(axis, name, study, axis_patches[axis]) for name in names}
        for axis, names in axes.items()
    }
    shared = merged({"eval": root["eval"], "seed": root["seed"]}, _shared_set(study))
    cells = [
        Cell.from_config({**{axis: nodes[axis][name] for axis, name in zip(AXES, combo)}, **shared})
        for combo in itertools.product(*axes.values())
    ]
    config = {key: value for key, value in root.items() if key not in (*AXES, "eval", "seed")}
    return Study(name=study["name"], config=config, cells=cells)


def _parse(overrides: Sequence[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        first_line = str(err).splitlines()[0]
        raise RFTBenchError(
            f"malformed override in {' '.join(overrides)!r}: {first_line}. "
            "Overrides look like key=value, e.g. study=paper dataset=caltech101,flowers102"
        ) from None


def _split(parsed: list[Override]) -> tuple[dict, dict, list[str]]:
    """(axis choices, per-axis patches, overrides for Hydra's composition)."""
    choices: dict[str, list[str] | Glob] = {}
    patches: dict[str, list[Override]] = {axis: [] for axis in AXES}
    for_hydra: list[str] = []
    for override in parsed:
        key = override.key_or_group
        if key in AXES and override.type == OverrideType.CHANGE:
            value = override.value()
            if isinstance(value, Glob):
                choices[key] = value
            elif override.is_sweep_override():
                choices[key] = list(override.sweep_string_iterator())
            else:
                choices[key] = [override.get_value_element_as_str()]
        elif key.split(".")[0] in AXES:
            patches[key.split(".")[0]].append(override)
        elif override.is_sweep_override():
            raise RFTBenchError(
                f"override {override.input_line!r}: several values are only allowed on the "
                f"grid axes {', '.join(AXES)}"
            )
        else:
            for_hydra.append(override.input_line)
    return choices, patches, for_hydra


def _compose(overrides: list[str]) -> dict[str, Any]:
    """The root config, composed once by Hydra and resolved to plain containers."""
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group in GROUPS and isinstance(override.value(), str):
            load_option(override.key_or_group, override.value())  # clear error for a bad name
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise RFTBenchError(f"cannot compose the config with {overrides}: {err}") from None


def _choose(axis: str, chosen: list[str] | Glob | None, study_options: list[str]) -> list[str]:
    if chosen is None:
        names = study_options
    elif isinstance(chosen, Glob):
        names = chosen.filter(options(axis))
        if not names:
            raise RFTBenchError(f"{axis}={chosen} matches no option; options: {options(axis)}")
    else:
        names = chosen
    for name in names:
        load_option(axis, name)  # validates the name
    return list(dict.fromkeys(names))


def _option_node(axis: str, name: str, study: dict, patches: list[Override]) -> dict[str, Any]:
    """An axis option's config with the study's patches and the command line's applied."""
    node = merged(load_option(axis, name), study.get("set", {}).get(axis, {}))
    node = merged(node, study.get("set_per_option", {}).get(f"{axis}/{name}", {}))
    for override in patches:
        node = _apply(node, override, axis, name)
    return node


def _apply(node: dict[str, Any], override: Override, axis: str, name: str) -> dict[str, Any]:
    *parents, leaf = override.key_or_group.split(".")[1:]
    if override.type == OverrideType.DEL:
        raise RFTBenchError(f"override {override.input_line!r}: deleting a key is not supported")
    patch: dict[str, Any] = {leaf: override.value()}
    target = node
    for key in parents:
        target = target.get(key) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            raise RFTBenchError(f"override {override.input_line!r}: {axis} {name!r} has no {key!r}")
    if leaf not in target and override.type != OverrideType.ADD:
        raise unknown_choice(f"key of {axis} {name!r} in {override.input_line!r}", leaf, target)
    for key in reversed(parents):
        patch = {key: patch}
    return merged(node, patch)


def _shared_set(study: dict) -> dict[str, Any]:
    """The study's `set` entries for the parts of a cell shared by all cells (eval, seed)."""
    shared = {key: value for key, value in study.get("set", {}).items() if key not in AXES}
    unknown = set(shared) - {"eval", "seed"}
    if unknown:
        raise RFTBenchError(
            f"study {study['name']!r}: `set` has keys {sorted(unknown)}; "
            f"valid: {', '.join((*AXES, 'eval', 'seed'))}"
        )
    return shared
