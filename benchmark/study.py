"""A study expanded into cells, fast: Hydra composes the root config once, then the grid is a
plain product over the axis options (and seeds), each option's YAML loaded and patched once.

Composing each of the paper's 1,440 cells through Hydra would take minutes; this takes well
under a second, and 100,000 cells take a second or two. Every name is validated here, before
anything is launched or written.

Overrides use Hydra's grammar. On an axis (dataset, model, loss, protocol) an override chooses
the axis' options and replaces the study's own: `dataset=caltech101,flowers102`,
`model='glob(vit_*)'`. A dotted key under an axis (`loss.trades_beta=6`) patches every option of
that axis. `seed` takes one value or a sweep, `seed=0,1,2` or `seed='range(70)'`, and replaces
the study's: one cell per seed per point of the grid (the seed is part of the cell's config,
hence of its id; seed 0 is the default). Everything else (`study=paper`, `eval.linf.eps=0.03`,
`launcher=slurm`) goes to Hydra's composition as usual.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, OverrideType
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf._utils import get_yaml_loader
from omegaconf.errors import OmegaConfBaseException

from benchmark.cell import AXES, Cell, grid
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


# OmegaConf's YAML loader (its float syntax, no timestamps, no duplicate keys) on libyaml's C
# parser: the same values as OmegaConf.load, ten times faster than it (a plan reads ~60 files).
_OMEGACONF_LOADER = get_yaml_loader()
try:
    from yaml.cyaml import CParser

    class _OptionLoader(CParser, _OMEGACONF_LOADER):
        def __init__(self, stream: str):
            CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
except ImportError:  # PyYAML built without libyaml
    _OptionLoader = _OMEGACONF_LOADER


@cache
def load_option(group: str, name: str) -> dict[str, Any]:
    """One option of a group as a plain dict (cached: planning reads each file once)."""
    if name not in options(group):
        raise unknown_choice(group, name, options(group))
    text = (CONF_DIR / group / f"{name}.yaml").read_text()
    if "${" in text:  # an interpolation: OmegaConf resolves it
        return OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    return yaml.load(text, Loader=_OptionLoader) or {}


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
    """Expand the study chosen by `overrides` (default `study=demo`) into its cells: the product
    of the axes' options, each point once per seed (the seeds of one point are adjacent)."""
    choices, axis_patches, hydra_overrides = _split(_parse(overrides))
    root = _compose(hydra_overrides)
    study = root["study"]
    shared = merged({"eval": root["eval"], "seed": root["seed"]}, _shared_set(study))
    # The study's settings of conditions that are not measured (e.g. with eval=[clean]) do not apply.
    shared["eval"] = {name: spec for name, spec in shared["eval"].items() if name in root["eval"]}
    product = {
        axis: [_option_node(axis, name, study, axis_patches[axis])
               for name in _choose(axis, choices.get(axis), study["axes"][axis])]
        for axis in AXES
    }
    product |= {"eval": [shared["eval"]], "seed": choices.get("seed", [shared["seed"]])}
    cells = [Cell.from_config(config, id_) for id_, config in grid(product)]
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
    """(axis choices and seeds, per-axis patches, overrides for Hydra's composition)."""
    choices: dict[str, list[str] | list[int] | Glob] = {}
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
        elif key == "seed" and override.type == OverrideType.CHANGE:
            choices[key] = _seeds(override)
        elif key.split(".")[0] in AXES:
            patches[key.split(".")[0]].append(override)
        elif override.is_sweep_override():
            raise RFTBenchError(
                f"override {override.input_line!r}: several values are only allowed on the "
                f"grid axes {', '.join(AXES)} and on seed"
            )
        else:
            for_hydra.append(override.input_line)
    return choices, patches, for_hydra


def _seeds(override: Override) -> list[int]:
    """The seeds of `seed=3`, `seed=0,1,2` or `seed='range(70)'`, in order, each once."""
    value = override.value()
    seeds = [value]
    if override.is_sweep_override() and not isinstance(value, Glob):
        try:
            seeds = list(override.sweep_iterator())
        except HydraException:  # an interval: no values to enumerate
            pass
    bad = [seed for seed in seeds if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0]
    if bad or not seeds:
        got = f"{bad[0]!r}" if bad else "no seed"
        raise RFTBenchError(f"override {override.input_line!r}: a seed is an integer >= 0, got {got}; "
                            "e.g. seed=1, seed=0,1,2 or seed='range(70)'")
    return list(dict.fromkeys(seeds))


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
