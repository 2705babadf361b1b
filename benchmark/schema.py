"""The typed schema of every config group: the one place a reader learns what a key means, and
where a bad value is refused, by `plan`, `launch` and `tune`, before anything is written.

Pydantic models, strict (a YAML or command-line value of the wrong type is refused, never
coerced: `protocol.epochs=abc` and `protocol.epochs=5.5` are both errors; an integer is
accepted where a float is expected) and closed (an unknown key is an error). Pydantic rather
than Hydra structured configs: the fast planner reads option files without OmegaConf, and
pydantic checks a plain dict in microseconds with errors that name the dotted key, the value
and the rule.

Keys that only one kind of loss, condition or launcher has are checked by that kind's registry
entry (its `schema`), so a new kind brings its own keys. Each option is checked once per plan,
not once per cell.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from benchmark.errors import RFTBenchError

NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0)]
RGB = Annotated[list[float], Field(min_length=3, max_length=3)]
A = TypeVar("A")
B = TypeVar("B")
Pair = Annotated[tuple[A, B], Field(strict=False)]  # a YAML list of two: a tuple only by coercion


class Strict(BaseModel):
    """Closed and strict: no unknown key, no coercion between types."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Open(Strict):
    """A node whose remaining keys belong to its kind (checked by the kind's registry entry)."""

    model_config = ConfigDict(extra="allow", strict=True)


# --- dataset ----------------------------------------------------------------------------------

class Augment(Strict):
    hflip: bool                                  # random horizontal flip
    color_jitter: NonNegative                    # brightness, contrast and saturation jitter
    rotation_degrees: NonNegative                # random rotation in [-d, d] degrees


class SplitSizes(Strict):
    """Published split sizes (images), so a cost prior needs no prepared data."""

    train: Annotated[int, Field(ge=0)]
    val: Annotated[int, Field(ge=0)]
    test_pool: Annotated[int, Field(ge=0)]       # the test split before the `test_size` subsample


class DatasetOption(Strict):
    name: str                                    # the option's file name
    study_name: str | None                       # the published study's name; null: not in it
    num_classes: Annotated[int, Field(ge=2)]
    source_format: str                           # a benchmark.prepare.SOURCE_FORMATS entry
    official_splits: list[Literal["train", "val", "test", "trainval"]]
    split_seed: Seed
    test_size: Count                             # stratified test subsample (images)
    test_subsample_seed: Seed
    image_size: Count                            # the model input: Resize((s, s)), no crop
    augment: Augment
    split_sizes: SplitSizes


# --- model ------------------------------------------------------------------------------------

class Pretraining(Strict):
    strategy: str
    data: str
    images: int | None


class ModelInput(Strict):
    size: Count
    mean: RGB                                    # the checkpoint's own statistics
    std: Annotated[list[Positive], Field(min_length=3, max_length=3)]
    # checkpoint: normalise with mean/std above; authors: the published pipeline's rule
    # (OpenAI-CLIP statistics iff the backbone's study name contains "laion", else ImageNet).
    normalization: Literal["checkpoint", "authors"]


class Weights(Strict):
    file: str                                    # relative to the weights root
    url: str | None


class ModelOption(Strict):
    name: str
    study_name: str | None
    source: Literal["timm", "local", "demo"]
    arch: str                                    # the timm architecture
    type: Literal["convolutional", "attention", "hybrid"]
    size: Literal["small", "medium", "large"]    # the study's classes: < 20M, 20-50M, >= 50M
    params_m: Positive
    pretraining: Pretraining
    input: ModelInput
    # classifier: only the final linear layer (timm get_classifier()) is the head;
    # module: timm's whole head module (ConvNeXt/EdgeNeXt: its LayerNorm too), as the authors.
    head: Literal["classifier", "module"]
    weights: Weights


# --- loss -------------------------------------------------------------------------------------

class Attack(Strict):
    name: Literal["apgd", "pgd"]
    objective: Literal["ce", "kl"]
    norm: Literal["Linf", "L2"]
    eps: NonNegative
    steps: Count
    step_size: Positive | None
    random_start: bool


class LossOption(Open):
    name: str
    kind: str                                    # a benchmark.loss_kinds.LOSSES entry
    study_name: str | None
    attack: Attack
    eps_schedule: dict[str, Any]                 # checked by the loss kinds' schedule check


# --- protocol ---------------------------------------------------------------------------------

class Optimizer(Strict):
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]
    lr_backbone: NonNegative
    lr_head: Positive
    weight_decay_backbone: NonNegative
    weight_decay_head: NonNegative


class ProtocolOption(Strict):
    name: str
    study_name: str | None
    epochs: Count
    train_backbone: bool                         # false: linear probing
    batch_size: Count                            # samples per forward/backward step (per process)
    effective_batch_size: Count                  # samples per optimizer update, all processes
    # Each epoch's shuffled order is cut to a multiple of this, as a DistributedSampler with
    # drop_last over that many ranks does (the study ran 4 ranks).
    drop_last_multiple: Count
    optimizer: Optimizer
    cosine: bool                                 # cosine annealing over the epochs
    # auto: fp16 autocast with a gradient scaler on CUDA, fp32 on the CPU; or one of them always
    precision: Literal["auto", "fp32", "fp16", "bf16"]


# --- root -------------------------------------------------------------------------------------

class Paths(Strict):
    results: str
    data: str
    weights: str


class Runtime(Strict):
    device: str                                  # auto | cpu | cuda | cuda:N
    # DataLoader workers; auto: from the job's CPUs (the allocation, less one for the main process)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"]
    eval_batch_size: Count
    gpu_tflops: Positive                         # sustained rate of the cost prior (plan's estimate)
    collective_timeout_s: Positive               # a rank waiting longer on its peers fails the cell
    retention: Literal["final", "all", "none"]   # what a done cell keeps: final weights, all, no weights
    history_validation_size: Annotated[int, Field(ge=0)]  # images of the per-epoch robust validation
    retention: Literal["final", "all", "none"]   # what a done cell keeps (benchmark.retention)
    history_validation_size: Annotated[int, Field(ge=0)]  # per-epoch robust validation images; 0: none


class Batching(Strict):
    """A study's rule for samples per step and per update (see conf/study/paper.yaml)."""

    ranks: Count
    target_samples: Count
    base: list[Pair[str, Count]]                 # (substring of the study name, per-GPU batch)
    default_base: Count
    class_scale: list[Pair[Count, Positive]]     # (up to this many classes, scale)
    factor: Positive
    halved_for: list[str]                        # loss kinds whose accumulation uses half a batch


class HparamsFallback(Strict):
    lr_backbone: Positive | None = None
    lr_head: Positive | None = None
    weight_decay_backbone: NonNegative | None = None
    weight_decay_head: NonNegative | None = None
    cosine: bool | None = None


class StudyConfig(Strict):
    name: str
    description: str
    axes: dict[Literal["dataset", "model", "loss", "protocol"], list[str]]
    set: dict[str, Any]
    set_per_option: dict[str, Any]
    hparams: str | None                          # per-cell hyper-parameter table (CSV/Parquet)
    hparams_fallback: dict[str, HparamsFallback] | None = None  # per protocol: cells the table lacks
    batching: Batching | None
    seed: Seed | None = None


def check(model: type[BaseModel], node: dict[str, Any], where: str, prefix: str) -> None:
    """Validate `node` against `model`; an RFTBenchError naming `where`, the dotted key
    (`prefix` + its path in the node), the value and the rule."""
    try:
        model.model_validate(node)
    except ValidationError as err:
        raise RFTBenchError(f"{where}: {describe(err, prefix)}") from None


# The names pydantic gives the members of a union in an error's location (not config keys).
_UNION_MEMBER = re.compile(r"^(constrained-\w+|literal\[.*\]|int|float|str|bool|none|(list|dict|tuple)\[.*\]|function-.*)$")


def describe(err: ValidationError, prefix: str) -> str:
    """Pydantic's errors as `key=value: rule` phrases (a union's alternatives joined by "or"),
    the first three keys."""
    phrases: dict[str, list[str]] = {}
    for item in err.errors():
        parts = [str(p) for p in (prefix, *item["loc"]) if p != "" and not _UNION_MEMBER.match(str(p))]
        key = ".".join(parts)
        if item["type"] == "missing":
            phrase = f"{key} is missing"
        elif item["type"] == "extra_forbidden":
            phrase = f"{key} is not a known key"
        else:
            value = repr(item["input"])
            value = value if len(value) <= 60 else value[:57] + "..."  # a whole node: the rule says more
            phrase = f"{key}={value}: {_lower_first(item['msg'])}"
        if key in phrases:  # another alternative of a union
            phrase = _lower_first(item["msg"])
        phrases.setdefault(key, []).append(phrase)
    shown = ["; or ".join(alternatives) for alternatives in list(phrases.values())[:3]]
    more = len(phrases) - len(shown)
    return "; ".join(shown) + (f" (and {more} more)" if more > 0 else "")


def _lower_first(message: str) -> str:
    return message[:1].lower() + message[1:]


GROUPS: dict[str, type[BaseModel]] = {
    "dataset": DatasetOption, "model": ModelOption, "loss": LossOption, "protocol": ProtocolOption,
}


class Bounds(Strict):
    low: NonNegative
    high: NonNegative
    log: bool                                    # sample log-uniformly (then low > 0)

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.low > self.high:
            raise ValueError(f"low {self.low} exceeds high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log-uniform range needs low > 0")
        return self


class Pruner(Strict):
    min_resource: Count                          # epochs before the first rung (ASHA's grace period)
    reduction_factor: Annotated[int, Field(ge=2)]


class Space(Strict):
    lr_backbone: Bounds | None = None
    lr_head: Bounds | None = None
    weight_decay_backbone: Bounds | None = None
    weight_decay_head: Bounds | None = None
    cosine: Annotated[list[bool], Field(min_length=1)] | None = None


class TuneOption(Strict):
    """conf/tune: the per-cell search of `rftbench tune` (benchmark/tune_space.py)."""

    name: str
    n_trials: Count                              # finished (complete or pruned) trials per cell
    timeout_minutes: Positive | None             # per cell and worker: no trial starts after it
    max_epochs: Count                            # a trial's epochs (the protocol's when fewer)
    workers: Count                               # per cell
    seed: Seed
    storage: str | None                          # null: a journal file under the study; or a database URL
    validation_size: Count                       # images of the objective's validation subset
    pruner: Pruner
    space: Space


class RootConfig(Open):
    """The root config's own keys; the groups' nodes are checked by their own models."""

    seed: Seed
    paths: Paths
    runtime: Runtime
    plugins: list[str]                           # modules imported to register extension kinds


def _kind_entry(registry_path: str, kind: str) -> Any:
    """The registry entry of `kind` in the registry at "module:NAME" (imported when checked)."""
    from benchmark.registry import resolve

    return resolve(registry_path)[kind]


def check_option(axis: str, name: str, node: dict[str, Any]) -> None:
    """An axis option's node (after the study's and the command line's patches)."""
    where = f"{axis} option {name!r}"
    check(GROUPS[axis], node, where, axis)
    if axis == "loss":  # its kind's own keys and its eps schedule
        from benchmark.registry import resolve

        try:
            resolve(LOSS_CHECK)(node)
        except RFTBenchError as err:
            message = str(err)
            raise RFTBenchError(message if message.startswith(where) else f"{where}: {message}") from None


def check_eval(eval_cfg: dict[str, dict[str, Any]]) -> None:
    """Every measured condition: its kind's keys, then the kinds' own checks."""
    from benchmark.registry import resolve

    for condition, cfg in eval_cfg.items():
        if not isinstance(cfg, dict) or "kind" not in cfg:
            raise RFTBenchError(f"eval.{condition} needs a `kind` (conf/eval/<name>.yaml)")
        entry = _kind_entry(CONDITION_REGISTRY, cfg["kind"])
        if getattr(entry, "schema", None) is not None:
            check(entry.schema, cfg, f"condition {condition!r}", f"eval.{condition}")
    resolve(CONDITION_CHECK)(eval_cfg)


def check_root(root: dict[str, Any]) -> None:
    """The root's own keys, the study's config, the launcher's and the search's."""
    from benchmark.registry import resolve

    check(RootConfig, {k: v for k, v in root.items() if k in RootConfig.model_fields}, "config", "")
    check(StudyConfig, root["study"], f"study {root['study'].get('name')!r}", "study")
    check(TuneOption, root["tune"], f"tune option {root['tune'].get('name')!r}", "tune")
    launcher = root["launcher"]
    launcher_schema = resolve(LAUNCHER_CLASS)(launcher.get("kind", launcher["name"])).schema
    if launcher_schema is not None:
        check(launcher_schema, launcher, f"launcher {launcher['name']!r}", "launcher")


# Where the kinds' registries live (torch-free modules, imported when a config is checked).
LOSS_CHECK = "benchmark.loss_kinds:check_loss_option"
CONDITION_REGISTRY = "benchmark.conditions:CONDITIONS"
CONDITION_CHECK = "benchmark.conditions:check_conditions"
LAUNCHER_CLASS = "launchers:launcher_class"
