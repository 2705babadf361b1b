"""`study=paper` trains as the published study did (../shared/reference/authors_protocol.md), and
`paper_corrected` differs from it exactly where the authors' pipeline is wrong. Expected numbers
are computed here from the protocol's own words, independently of the code under test."""
from __future__ import annotations

import math

import pytest

from benchmark.study import load_option, plan

# authors_protocol.md, "Samples per optimizer update": per-GPU batch by family (first match, in
# this order), class-count scale, 3/4, int; accumulation to 1,024 samples over 4 ranks, computed
# from half the batch for TRADES.
FAMILIES = [(("convnext_tiny",), 64), (("coatnet_2",), 12), (("convnext_base",), 22), (("coatnet_0",), 32),
            (("deit_small", "eva02_tiny", "swin_tiny", "vit_small"), 88),
            (("vit_base", "swin_base", "eva02_base"), 40), (("resnet50",), 64), (("coat_tiny",), 20)]


def their_batch(backbone: str, classes: int) -> int:
    base = next((b for names, b in FAMILIES if any(n in backbone for n in names)), 30)
    scale = 1.0 if classes <= 10 else 0.85 if classes <= 35 else 0.75 if classes <= 105 else 0.70
    return int(base * scale * 3 / 4)


def their_steps(batch: int, loss: str) -> int:
    per_gpu = int(batch * 0.5) if loss == "TRADES" else batch
    return max(1, 1024 // (4 * per_gpu))


@pytest.fixture(scope="module")
def paper():
    return plan(["study=paper"])


def test_every_paper_cell_steps_and_updates_on_the_authors_samples(paper):
    assert len(paper.cells) == 1440
    for cell in paper.cells:
        config = cell.config
        batch = their_batch(config["model"]["study_name"], config["dataset"]["num_classes"])
        steps = their_steps(batch, config["loss"]["study_name"])
        protocol = config["protocol"]
        assert (protocol["batch_size"], protocol["effective_batch_size"]) == (batch, 4 * batch * steps), cell.slug
        assert protocol["drop_last_multiple"] == 4


def test_a_few_batch_sizes_worked_by_hand(paper):
    cells = {c.slug: c.config["protocol"] for c in paper.cells}
    # ConvNeXt-T on UC Merced (21 classes): int(64 x 0.85 x 0.75) = 40; Classic AT: 1024 // 160 = 6
    # steps; TRADES: 1024 // (4 x 20) = 12 steps, so 1,920 samples per update.
    at = cells["uc_merced__convnext_tiny.fb_in1k__classic_at__fft50__seed1"]
    trades = cells["uc_merced__convnext_tiny.fb_in1k__trades__fft50__seed1"]
    assert (at["batch_size"], at["effective_batch_size"]) == (40, 960)
    assert (trades["batch_size"], trades["effective_batch_size"]) == (40, 1920)
    # CoAtNet-2 on Stanford Cars (196 classes): int(12 x 0.70 x 0.75) = 6; 1024 // 24 = 42 steps.
    cars = cells["stanford_cars__coatnet_2_rw_224.sw_in12k__classic_at__lp50__seed1"]
    assert (cars["batch_size"], cars["effective_batch_size"]) == (6, 1008)


@pytest.mark.slow
@pytest.mark.parametrize(("batch", "steps"), [(7, 3), (16, 1)])
def test_one_process_makes_as_many_updates_per_epoch_as_their_four_ranks(roots, batch, steps):
    """Their rank: floor(n / 4) images (DistributedSampler, drop_last), batches of `batch`, a step
    every `steps` batches and at the last: ceil(ceil(floor(n/4) / batch) / steps) updates."""
    from benchmark import data, models, train

    config = plan(["study=demo", "model=test_resnet.demo", "protocol=lp50", "loss.attack.eps=0"]).cells[0].config
    splits = data.load_splits(config["dataset"], roots["data"])
    protocol = {**config["protocol"], "epochs": 1, "batch_size": batch,
                "effective_batch_size": 4 * batch * steps, "drop_last_multiple": 4}
    model = models.create_model(config["model"], splits.num_classes, roots["weights"])
    trainer = train.Trainer(model, splits, config["loss"], protocol, ckpt_path=roots["results"] / "last.pt",
                            device=train.torch.device("cpu"), seed=0)
    updates = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (updates.append(1), step(*a, **k))[1]
    trainer.fit()
    per_rank = len(splits.train) // 4
    assert len(updates) == math.ceil(math.ceil(per_rank / batch) / steps)


def test_normalisation_follows_the_authors_rule_in_paper_and_the_checkpoint_in_paper_corrected(paper):
    from timm.data import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN

    from benchmark.models import input_statistics

    corrected = {c.slug: c for c in plan(["study=paper_corrected"]).cells}
    differs = set()
    for cell in paper.cells[::6]:
        model = cell.config["model"]
        expected = OPENAI_CLIP_MEAN if "laion" in model["study_name"] else IMAGENET_DEFAULT_MEAN
        assert input_statistics(model)[0] == list(expected), cell.model
        own = corrected[cell.slug].config["model"]
        assert input_statistics(own)[0] == own["input"]["mean"]
        if own["input"]["mean"] != list(expected):
            differs.add(cell.model)
    assert 10 <= len(differs) <= 14  # "about 12 backbones' checkpoints expect other statistics"


def test_paper_corrected_differs_only_in_normalisation_and_trades_samples_per_update(paper):
    corrected = {c.slug: c.config for c in plan(["study=paper_corrected"]).cells}
    for cell in paper.cells:
        other = corrected[cell.slug]
        assert other["model"]["input"]["normalization"] == "checkpoint"
        assert cell.config["model"]["input"]["normalization"] == "authors"
        same = {**other, "model": cell.config["model"], "protocol": cell.config["protocol"]}
        assert same == cell.config
        batch, loss = cell.config["protocol"]["batch_size"], cell.config["loss"]["study_name"]
        assert other["protocol"]["effective_batch_size"] == 4 * batch * their_steps(batch, "Classic AT")
        if loss != "TRADES":
            assert other["protocol"] == cell.config["protocol"]


def test_paper_cells_use_seed_1_the_head_module_and_the_authors_corruptions(paper):
    assert {c.seed for c in paper.cells} == {1}
    assert {c.config["model"]["head"] for c in paper.cells} == {"module"}
    common = paper.cells[0].config["eval"]["common"]
    assert (common["resolution"], common["assignment"], common["severity"]) == ("native", "blocks", 3)


def test_the_convnext_head_module_holds_the_layernorm_and_linear_probing_trains_it():
    import timm

    from benchmark.models import Classifier

    backbone = timm.create_model("test_convnext", pretrained=False, num_classes=10)
    module = Classifier(backbone, [0.5] * 3, [0.5] * 3, head="module")
    linear = Classifier(backbone, [0.5] * 3, [0.5] * 3, head="classifier")
    norm = {id(p) for p in backbone.head.norm.parameters()}
    assert norm <= {id(p) for p in module.head_parameters()}
    assert not norm & {id(p) for p in linear.head_parameters()}
    module.freeze_backbone()
    assert all(p.requires_grad for p in backbone.head.norm.parameters())
    assert module.train().head().training and not backbone.stages.training
    assert load_option("model", "convnext_tiny.fb_in1k")["head"] == "classifier"  # the option's own default


def _value(config: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def test_the_fidelity_table_in_the_docs_states_the_configured_values(paper):
    """docs/fidelity.md: where a row names a config key and a literal value for a study, every
    cell of that study that has the key holds that value."""
    import re

    import yaml

    from benchmark.paths import PROJECT_DIR

    corrected = plan(["study=paper_corrected"])
    rows = [line.split("|")[1:-1] for line in (PROJECT_DIR / "docs" / "fidelity.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| choice")]
    checked = 0
    for choice, _, key_cell, *columns in rows:
        key = re.fullmatch(r"\s*`([\w.]+)`\s*", key_cell)
        for study, column in zip((paper, corrected), columns):
            literal = re.match(r"\s*`([^`\s]+)`", column)
            if key is None or literal is None:
                continue
            expected = yaml.safe_load(literal.group(1))
            values = {repr(_value(c.config, key.group(1))) for c in study.cells} - {"None"}
            assert values == {repr(expected)}, (choice, study.name)
            checked += 1
    assert checked >= 16
