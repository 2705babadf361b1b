"""A study expanded into cells, fast: Hydra composes the root config once, then the grid is a
plain product over the axis options (and seeds), each option's YAML loaded, patched and checked
once.

Composing each of the paper's 1,440 cells through Hydra would take minutes; this takes well
under a second, and 100,000 cells take a second or two. Every name and value is validated here
(`benchmark.schema`), before anything is launched or written.

Overrides use Hydra's grammar. On an axis (dataset, model, loss, protocol) an override chooses
the axis' options and replaces the study's own: `dataset=caltech101,flowers102`,
`model='glob(vit_*)'`. A dotted key under an axis (`loss.trades_beta=6`) patches every option of
that axis. `seed` takes one value or a sweep, `seed=0,1,2` or `seed='range(70)'`, and replaces
the study's: one cell per seed per point of the grid (the seed is part of the cell's config,
hence of its id). Everything else (`study=paper`, `eval.linf.eps=0.03`, `launcher=slurm`) goes
to Hydra's composition as usual.

A value of an axis option comes from, lowest precedence first: the option file (with its bases:
a `defaults:` list of `_`-named files of the same group, as Hydra merges them), the study's
`set` and `set_per_option`, the study's `batching` rule (samples per step and per update), its
per-cell hyper-parameter table (`hparams`, else `hparams_fallback`), the command line.
`Study.sources(cell)` says where each value that did not come from the option file came from.

Config directories: the project's `conf/`, then those of `$RFTBENCH_CONF_PATH` (separated like
PATH): an extension adds options there and registers its kinds from a module named in the
root config's `plugins` list.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
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

from benchmark import hparams, schema
from benchmark.cell import AXES, Cell, grid
from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.paths import CONF_DIR
from benchmark.registry import load_plugins

# Groups whose option is chosen on the command line (`group=option`), validated by name.
GROUPS = (*AXES, "eval", "study", "launcher", "tune")
ENV_CONF_PATH = "RFTBENCH_CONF_PATH"


def conf_dirs() -> list[Path]:
    """The project's config directory, then those named by $RFTBENCH_CONF_PATH."""
    extra = [Path(p) for p in os.environ.get(ENV_CONF_PATH, "").split(os.pathsep) if p]
    return [CONF_DIR, *extra]


@dataclass(frozen=True)
class Study:
    """A planned study: its resolved root config (paths, runtime, launcher, study), its cells and
    what planning noticed (`notes`: e.g. how many cells took a hyper-parameter fallback)."""

    name: str
    config: dict[str, Any]
    cells: list[Cell]
    notes: dict[str, Any] = field(default_factory=dict)
    layers: _Layers | None = field(default=None, compare=False, repr=False)

    @property
    def dir(self) -> Path:
        return Path(self.config["paths"]["results"]) / self.name

    def sources(self, cell: Cell) -> dict[str, str]:
        """Dotted key -> where its value came from, for every value of the cell's config that
        is not its option file's (study set, batching rule, table, fallback, command line)."""
        return self.layers.sources(cell) if self.layers else {}


def options(group: str) -> list[str]:
    """The option names of a group: its YAML files' names, bases (`_*.yaml`) excluded."""
    return sorted({p.name.removesuffix(".yaml") for directory in conf_dirs()
                   for p in (directory / group).glob("*.yaml") if not p.name.startswith("_")})


def option_path(group: str, name: str) -> Path:
    """The file of option (or base) `name` of `group`: the first config directory that has it."""
    for directory in conf_dirs():
        path = directory / group / f"{name}.yaml"
        if path.is_file():
            return path
    raise unknown_choice(group, name, options(group))


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


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file as a plain dict, with OmegaConf's value rules (fast: libyaml)."""
    text = path.read_text()
    if "${" in text:  # an interpolation: OmegaConf resolves it
        return OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    return yaml.load(text, Loader=_OptionLoader) or {}


@cache
def load_option(group: str, name: str) -> dict[str, Any]:
    """One option of a group as a plain dict, its bases merged in (cached: planning reads each
    file once). A grid-axis option may start with a Hydra defaults list of bases of its own
    group, `defaults: [_attack, _self_]`, merged in order as Hydra does (`_self_` last when
    absent); a study's `defaults` is Hydra's business and is left as it is."""
    if not name.startswith("_") and name not in options(group):
        raise unknown_choice(group, name, options(group))
    node = read_yaml(option_path(group, name))
    if group not in AXES or "defaults" not in node:
        return node
    return _with_bases(group, name, node)


def _with_bases(group: str, name: str, node: dict[str, Any]) -> dict[str, Any]:
    entries = node.pop("defaults")
    if "_self_" not in entries:
        entries = [*entries, "_self_"]
    merged_node: dict[str, Any] = {}
    for entry in entries:
        if entry == "_self_":
            merged_node = merged(merged_node, node)
        elif isinstance(entry, str) and entry.startswith("_"):
            merged_node = merged(merged_node, load_option(group, entry))
        else:
            raise RFTBenchError(f"{group} option {name!r}: its `defaults` may name only bases of its own group "
                                f"(files named _*.yaml) and _self_, got {entry!r}")
    return {**{key: merged_node[key] for key in node}, **merged_node}  # the option's own keys first


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
    """Expand the study chosen by `overrides` (default `study=demo`) into its checked cells: the
    product of the axes' options, each point once per seed (the seeds of one point are adjacent)."""
    choices, axis_patches, hydra_overrides, eval_patches = _split(parse_overrides(overrides))
    root = _compose(hydra_overrides)
    load_plugins(root.get("plugins") or [])
    study = root["study"]
    schema.check_root(root)
    shared = merged({"eval": root["eval"], "seed": root["seed"]}, _shared_set(study))
    # The study's settings of conditions that are not measured (e.g. with eval=[clean]) do not apply.
    shared["eval"] = {name: spec for name, spec in shared["eval"].items() if name in root["eval"]}
    for override in eval_patches:  # the command line over the study's settings
        shared = _apply(shared, override, "config", "with conditions " + ", ".join(shared["eval"]), root_key=True)
    schema.check_eval(shared["eval"])
    layers = _Layers(study, axis_patches)
    product = {axis: [layers.option(axis, name) for name in _choose(axis, choices.get(axis), study["axes"][axis])]
               for axis in AXES}
    layers.check_patches_applied()
    product |= {"eval": [shared["eval"]], "seed": choices.get("seed", [shared["seed"]])}
    cells = [Cell.from_config(config, id_) for id_, config in grid(product, layers.per_cell)]
    config = {key: value for key, value in root.items() if key not in (*AXES, "eval", "seed")}
    return Study(name=study["name"], config=config, cells=cells, notes=layers.notes(cells), layers=layers)


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    """`key=value` words parsed by Hydra's grammar; a malformed one is an RFTBenchError."""
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        first_line = str(err).splitlines()[0]
        raise RFTBenchError(
            f"malformed override in {' '.join(overrides)!r}: {first_line}. "
            "Overrides look like key=value, e.g. study=paper dataset=caltech101,flowers102"
        ) from None


def _split(parsed: list[Override]) -> tuple[dict, dict, list[str], list[Override]]:
    """(axis choices and seeds, per-axis patches, overrides for Hydra's composition, patches of
    the measured conditions: applied after the study's settings, as the axes' are)."""
    choices: dict[str, list[str] | list[int] | Glob] = {}
    patches: dict[str, list[Override]] = {axis: [] for axis in AXES}
    for_hydra: list[str] = []
    eval_patches: list[Override] = []
    for override in parsed:
        key = override.key_or_group
        if key.startswith("eval.") and override.type == OverrideType.CHANGE and not override.is_sweep_override():
            eval_patches.append(override)
            continue
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
    return choices, patches, for_hydra, eval_patches


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
    for override in parse_overrides(overrides):
        if override.key_or_group in GROUPS and isinstance(override.value(), str):
            load_option(override.key_or_group, override.value())  # clear error for a bad name
    extra = [f"file://{directory.resolve()}" for directory in conf_dirs()[1:]]
    search = [f"hydra.searchpath=[{','.join(extra)}]"] if extra else []
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*search, *overrides])
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


class _Layers:
    """The layers of values over the axis options, lowest first, for `plan` (the nodes) and for
    `Study.sources` (where each value came from). An option's study layers and command line are
    applied once; the per-cell layers (batching rule, hyper-parameter table) once per grid point."""

    def __init__(self, study: dict[str, Any], cli: dict[str, list[Override]]):
        self.study, self.cli = study, cli
        self.table = hparams.read(study["hparams"], options) if study.get("hparams") else None
        self.fallback: dict[str, dict[str, Any]] = study.get("hparams_fallback") or {}
        self._points: dict[tuple[int, ...], dict[str, Any]] = {}
        # Per command-line patch, the error of each option that lacks its key: a patch applies
        # to the chosen options that have the key (`loss.trades_beta=6` patches TRADES only)
        # and is refused when none has it.
        self._missing: dict[str, list[RFTBenchError]] = {}
        self._applied: set[str] = set()

    def option(self, axis: str, name: str) -> dict[str, Any]:
        """The option's node with the study's and the command line's patches, checked."""
        node = self._with_cli(self._study_node(axis, name), axis, name)
        schema.check_option(axis, name, node)
        return node

    def _with_cli(self, node: dict[str, Any], axis: str, name: str) -> dict[str, Any]:
        for override in self.cli[axis]:
            try:
                node = _apply(node, override, axis, name)
                self._applied.add(override.input_line)
            except MissingKeyError as err:
                self._missing.setdefault(override.input_line, []).append(err)
        return node

    def check_patches_applied(self) -> None:
        """Refuse a command-line patch whose key none of the chosen options has."""
        for line, errors in self._missing.items():
            if line not in self._applied:
                raise errors[0]

    def _study_layers(self, axis: str, name: str) -> list[tuple[str, dict[str, Any]]]:
        """(source, patch) of the study's own layers over an axis option, lowest first."""
        return [(f"study.set.{axis}", self.study.get("set", {}).get(axis, {})),
                (f"study.set_per_option.{axis}/{name}", self.study.get("set_per_option", {}).get(f"{axis}/{name}", {}))]

    def _study_node(self, axis: str, name: str) -> dict[str, Any]:
        node = load_option(axis, name)
        for _, patch in self._study_layers(axis, name):
            node = merged(node, patch)
        return node

    def per_cell(self, values: dict[str, Any]) -> dict[str, Any]:
        """`values` with the protocol node of this grid point (batching rule, table row) when it
        has per-cell values; the node is built once per point and shared by its seeds."""
        if not (self.study.get("batching") or self.table or self.fallback):
            return values
        key = tuple(id(values[axis]) for axis in AXES)
        node = self._points.get(key)
        if node is None:
            node = self._points[key] = self._point_protocol(values)
        return values if node is values["protocol"] else {**values, "protocol": node}

    def _point_protocol(self, values: dict[str, Any]) -> dict[str, Any]:
        layers = self.point_layers({axis: values[axis] for axis in AXES})
        if not layers:
            return values["protocol"]
        name = values["protocol"]["name"]
        node = self._study_node("protocol", name)
        for _, patch in layers:
            node = merged(node, patch)
        return self._with_cli(node, "protocol", name)

    def point_layers(self, nodes: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        """(source, patch of the protocol node) of the per-cell layers of a grid point."""
        layers = []
        if self.study.get("batching"):
            layers.append(("study.batching (per-cell rule)", batching(self.study["batching"], nodes)))
        key = tuple(nodes[axis]["name"] for axis in AXES)
        if self.table and key in self.table.patches:
            layers.append((f"study.hparams ({self.table.path.name})", self.table.patches[key]))
        elif key[3] in self.fallback:
            layers.append((f"study.hparams_fallback.{key[3]}", _fallback_patch(self.fallback[key[3]])))
        return layers

    def notes(self, cells: list[Cell]) -> dict[str, Any]:
        """What the per-cell layers did: cells from the table, from a fallback, from neither."""
        if not (self.table or self.fallback):
            return {}
        points = {tuple(c.axes.values()) for c in cells}
        in_table = {p for p in points if self.table and p in self.table.patches}
        fallback = {p for p in points - in_table if p[3] in self.fallback}
        return {"hparams": {"table": str(self.table.path) if self.table else None, "points": len(points),
                            "from_table": len(in_table), "from_fallback": len(fallback),
                            "from_protocol": len(points - in_table - fallback)}}

    def sources(self, cell: Cell) -> dict[str, str]:
        layers = [(f"study.set.{key}", {key: value}) for key, value in _shared_set(self.study).items()]
        layers += [(source, {axis: patch}) for axis in AXES for source, patch in self._study_layers(axis, cell.axes[axis])]
        layers += [(source, {"protocol": patch}) for source, patch in
                   self.point_layers({axis: cell.config[axis] for axis in AXES})]
        layers += [(f"command line: {o.input_line}", {axis: _override_patch(o)})
                   for axis in AXES for o in self.cli[axis] if _has_key(cell.config[axis], o)]
        found: dict[str, str] = {}
        for source, patch in layers:
            for key in _leaves(patch):
                found[key] = source
        return found


def batching(rule: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The protocol patch of a study's batching rule for one grid point: samples per step
    (`batch_size`, the per-rank batch) and per update (`effective_batch_size`, all ranks), and
    the epoch cut to a multiple of the ranks (`drop_last_multiple`).

    Per-rank batch = int(base x class scale x factor), base = that of the first `base` entry
    whose substring is in the model's study name (else `default_base`), scale = that of the
    first `class_scale` entry whose class count is >= the dataset's. Accumulation steps =
    max(1, target_samples // (ranks x b')), b' = int(batch / 2) for the losses of `halved_for`,
    else the batch; samples per update = ranks x batch x steps.
    """
    model, dataset, loss = nodes["model"], nodes["dataset"], nodes["loss"]
    name = model.get("study_name") or model["name"]
    base = next((b for part, b in rule["base"] if part in name), rule["default_base"])
    classes = dataset["num_classes"]
    scale = next((s for limit, s in rule["class_scale"] if classes <= limit), None)
    if scale is None:
        raise RFTBenchError(f"study.batching.class_scale has no entry for {classes} classes (dataset "
                            f"{dataset['name']!r}); its largest is {rule['class_scale'][-1][0]}")
    batch = int(base * scale * rule["factor"])
    per_update = int(batch * 0.5) if loss["kind"] in rule["halved_for"] else batch
    steps = max(1, rule["target_samples"] // (rule["ranks"] * per_update))
    return {"batch_size": batch, "effective_batch_size": rule["ranks"] * batch * steps,
            "drop_last_multiple": rule["ranks"]}


def _fallback_patch(values: dict[str, Any]) -> dict[str, Any]:
    optimizer = {k: v for k, v in values.items() if k in hparams.OPTIMIZER_KEYS}
    return {"optimizer": optimizer, **({"cosine": values["cosine"]} if "cosine" in values else {})}


def _leaves(node: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys += _leaves(value, path + ".") if isinstance(value, dict) else [path]
    return keys


def _override_patch(override: Override, root_key: bool = False) -> dict[str, Any]:
    parts = override.key_or_group.split(".")
    *parents, leaf = parts if root_key else parts[1:]
    patch: dict[str, Any] = {leaf: override.value()}
    for key in reversed(parents):
        patch = {key: patch}
    return patch


class MissingKeyError(RFTBenchError):
    """A command-line patch names a key that an option does not have."""


def _has_key(node: dict[str, Any], override: Override) -> bool:
    for key in override.key_or_group.split(".")[1:]:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _apply(node: dict[str, Any], override: Override, axis: str, name: str, root_key: bool = False) -> dict[str, Any]:
    """`node` patched by `override` (its key below the axis, or from the root with `root_key`)."""
    parts = override.key_or_group.split(".")
    *parents, leaf = parts if root_key else parts[1:]
    if override.type == OverrideType.DEL:
        raise RFTBenchError(f"override {override.input_line!r}: deleting a key is not supported")
    target = node
    for key in parents:
        target = target.get(key) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            raise MissingKeyError(f"override {override.input_line!r}: {axis} {name!r} has no {key!r}")
    if leaf not in target and override.type != OverrideType.ADD:
        error = unknown_choice(f"key of {axis} {name!r} in {override.input_line!r}", leaf, target)
        raise MissingKeyError(str(error))
    return merged(node, _override_patch(override, root_key))


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
