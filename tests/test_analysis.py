"""Analysis: rankings, statistics, figures and the report, on a small synthetic study of "own runs"
(with per-example results) and on the imported published table. No published number appears
here: every expectation is an invariant or is recomputed from the table under test."""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multicomp import pairwise_tukeyhsd

from analysis import bootstrap, data, figures, rankings, report, stats
from analysis.data import AnalysisWarning
from analysis.letters import compact_letters
from benchmark.cell import EXAMPLES_FILE, ROWS_FILE, write_config
from benchmark.cli import main
from benchmark.errors import RFTBenchError
from benchmark.results import write_rows
from benchmark.study import load_option, plan
from benchmark.tables import load
from benchmark.reference import DEFAULT_STUDY
from factories import result_row

SYNTH = "synth"
# Two per size class where the registry allows, mixing types and pretraining strategies.
MODELS = (
    "regnetx_004.pycls_in1k", "deit_tiny_patch16_224.fb_in1k", "coat_tiny.in1k",
    "convnext_tiny.fb_in1k", "vit_small_patch16_224.dino", "robust_resnet50",
    "convnext_base.fb_in22k", "vit_base_patch16_224.mae",
)
DATASETS = ("uc_merced", "oxford_pet")
N_EXAMPLES = 80
# The configuration planted to predict one class on one dataset (clean accuracy = chance).
DEGENERATE = ("lp50", "uc_merced", "regnetx_004.pycls_in1k", "classic_at")
# Each condition's accuracy as a share of clean, in the order a cell's rows list them.
DROP = {"clean": 1.0, "linf": 0.5, "l2": 0.6, "l1": 0.4, "common": 0.85}


def write_synthetic_study(results_root: Path, study: str = SYNTH) -> pd.DataFrame:
    """Cell directories as a run writes them (config, rows, per-example results), accuracies drawn
    from a seeded model of quality by size class; returns the long table written."""
    planned = plan(["study=paper", f"dataset={','.join(DATASETS)}", f"model={','.join(MODELS)}"])
    rng = np.random.default_rng(0)
    quality = {"small": 0.5, "medium": 0.65, "large": 0.8}
    written = []
    for cell in planned.cells:
        cell_dir = cell.directory(results_root / study)
        write_config(cell, cell_dir, study)
        base = quality[cell.config["model"]["size"]] + (0.05 if cell.loss == "trades" else 0.0)
        degenerate = (cell.protocol, cell.dataset, cell.model, cell.loss) == DEGENERATE
        rows, examples = [], []
        for condition, factor in DROP.items():
            if degenerate:  # a constant prediction: chance accuracy, untouched by any attack
                correct = np.arange(N_EXAMPLES) % cell.config["dataset"]["num_classes"] == 0
            else:
                correct = rng.random(N_EXAMPLES) < np.clip(base * factor + rng.normal(0, 0.05), 0.02, 0.98)
            examples.append(pd.DataFrame({"condition": condition, "index": np.arange(N_EXAMPLES), "correct": correct}))
            rows.append(result_row(cell, condition, study=study, n_examples=N_EXAMPLES, n_correct=int(correct.sum()),
                                   accuracy=float(correct.mean()), source="run"))
        pq.write_table(pa.Table.from_pandas(pd.concat(examples), preserve_index=False), cell_dir / EXAMPLES_FILE)
        write_rows(cell_dir / ROWS_FILE, rows)
        written += rows
    return pd.DataFrame(written)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    write_synthetic_study(root)
    return root


@pytest.fixture(scope="module")
def synth_cells(synth_root: Path) -> pd.DataFrame:
    return data.load(SYNTH, synth_root)


@pytest.fixture(scope="module")
def synth_tables(synth_cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return rankings.rankings(synth_cells)


@pytest.fixture(scope="module")
def published_cells(published_root: Path) -> pd.DataFrame:
    return data.load(DEFAULT_STUDY, published_root)


@pytest.fixture(scope="module")
def published_tables(published_cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return rankings.rankings(published_cells)


def tiny_long(accuracies: dict[tuple[str, str, str], float], protocol: str = "fft50", dataset: str = "digits") -> pd.DataFrame:
    """A long table from {(model, loss, condition): accuracy} on one dataset and protocol."""
    return pd.DataFrame([
        {"protocol": protocol, "dataset": dataset, "model": m, "loss": l, "condition": c, "accuracy": a}
        for (m, l, c), a in accuracies.items()
    ])


# --- Borda definition -------------------------------------------------------------------------

def test_borda_ranks_ascending_with_average_ties():
    acc = {("test_resnet.demo", "trades", "clean"): 0.9, ("test_convnext.demo", "trades", "clean"): 0.8,
           ("test_vit.demo", "trades", "clean"): 0.8,
           ("test_resnet.demo", "trades", "linf"): 0.1, ("test_convnext.demo", "trades", "linf"): 0.3,
           ("test_vit.demo", "trades", "linf"): 0.2}
    table = rankings.ranking(data.prepare(tiny_long(acc)), "fft50").set_index("model")
    # clean ranks: resnet 3, convnext and vit tie at (1 + 2) / 2; linf ranks: resnet 1, convnext 3, vit 2
    assert table["borda"].to_dict() == {"test_resnet.demo": 4.0, "test_convnext.demo": 4.5, "test_vit.demo": 3.5}
    assert table["rank"].to_dict() == {"test_convnext.demo": 1, "test_resnet.demo": 2, "test_vit.demo": 3}
    assert table.loc["test_resnet.demo", "score_sum"] == pytest.approx(1.0)
    assert table.loc["test_convnext.demo", "mean_linf"] == pytest.approx(0.3)


def test_incomplete_configuration_is_left_out_with_a_warning():
    acc = {(m, "trades", c): 0.5 for m in ("test_resnet.demo", "test_vit.demo") for c in ("clean", "linf")}
    del acc[("test_vit.demo", "trades", "linf")]
    with pytest.warns(AnalysisWarning, match="test_vit.demo/trades"):
        table = rankings.ranking(data.prepare(tiny_long(acc)), "fft50")
    assert list(table["model"]) == ["test_resnet.demo"]


def test_a_model_without_a_config_is_named():
    acc = {("no_such_backbone", "trades", "clean"): 0.5, ("test_vit.demo", "trades", "clean"): 0.5}
    with pytest.raises(RFTBenchError, match="no_such_backbone"):
        data.prepare(tiny_long(acc))


def test_missing_columns_are_named():
    with pytest.raises(RFTBenchError, match="accuracy"):
        data.prepare(pd.DataFrame({"protocol": ["fft50"]}))


# --- compact letter display ---------------------------------------------------------------------

def test_compact_letters_examples():
    assert compact_letters(["A", "B", "C"], []) == {"A": "a", "B": "a", "C": "a"}
    assert compact_letters(["A", "B", "C"], [("A", "C")]) == {"A": "a", "B": "ab", "C": "b"}
    assert compact_letters(["A", "B", "C"], [("A", "B"), ("A", "C"), ("B", "C")]) == {"A": "a", "B": "b", "C": "c"}


@pytest.mark.parametrize("seed", range(20))
def test_compact_letters_share_a_letter_exactly_when_not_different(seed: int):
    rng = np.random.default_rng(seed)
    groups = [f"g{i}" for i in range(rng.integers(2, 9))]
    different = [pair for pair in itertools.combinations(groups, 2) if rng.random() < 0.4]
    letters = compact_letters(groups, different)
    for a, b in itertools.combinations(groups, 2):
        shares = bool(set(letters[a]) & set(letters[b]))
        assert shares == ((a, b) not in different), (a, b, letters)
    assert letters[groups[0]].startswith("a")


def test_tukey_letters_agree_with_statsmodels():
    rng = np.random.default_rng(3)
    table = pd.DataFrame({"borda": np.concatenate([rng.normal(m, 1.0, 6) for m in (0, 0.5, 3, 3.2)]),
                          "size": np.repeat(["small", "medium", "large", "huge"], 6)})
    rows = stats.main_effects({"p": table}, factors=("size",))
    letters = dict(zip(rows["level"], rows["tukey"]))
    tukey = pairwise_tukeyhsd(table["borda"], table["size"]).summary_frame()
    for row in tukey.itertuples():
        assert bool(set(letters[row.group_t]) & set(letters[row.group_c])) == (not row.reject)
    assert rows["anova_p"].iloc[0] == pytest.approx(scipy_stats.f_oneway(*[g["borda"] for _, g in table.groupby("size")]).pvalue)


def test_an_untestable_factor_says_why():
    table = pd.DataFrame({"borda": [1.0, 2.0, 3.0], "size": ["small"] * 3})
    rows = stats.main_effects({"p": table}, factors=("size",))
    assert rows["anova_p"].isna().all() and rows["note"].iloc[0].startswith("not tested")


# --- the synthetic study -------------------------------------------------------------------------

def n_configurations(cells: pd.DataFrame, protocol: str) -> int:
    return cells.loc[cells["protocol"] == protocol, ["model", "loss"]].drop_duplicates().shape[0]


def test_ranking_invariants_on_the_synthetic_study(synth_cells, synth_tables):
    assert list(synth_tables) == ["fft50", "fft5", "lp50"]
    n_cond = synth_cells["condition"].nunique()
    for protocol, table in synth_tables.items():
        n = n_configurations(synth_cells, protocol)
        assert len(table) == n == len(MODELS) * 2
        assert not table.duplicated(["model", "loss"]).any()
        assert sorted(table["rank"]) == list(range(1, n + 1))
        assert table["borda"].is_monotonic_decreasing
        lo, hi = len(DATASETS) * n_cond, rankings.max_borda(synth_cells, table)
        assert hi == n * len(DATASETS) * n_cond
        assert table["borda"].between(lo, hi).all()
        # the Borda points of each dataset x condition sum to 1 + ... + n
        assert table["borda"].sum() == pytest.approx(len(DATASETS) * n_cond * n * (n + 1) / 2)
        assert list(table.columns[:6]) == ["protocol", "model", "loss", "borda", "score_sum", "rank"]
        assert {"mean_clean", "mean_linf", "mean_common", "size", "type", "pretraining"} <= set(table.columns)


def test_planted_degenerate_configuration_is_flagged(synth_tables):
    protocol, dataset, model, loss = DEGENERATE
    table = synth_tables[protocol].set_index(["model", "loss"])
    assert table.loc[(model, loss), "degenerate"]
    assert dataset in table.loc[(model, loss), "degenerate_datasets"]
    assert not synth_tables["fft50"]["degenerate"].any()


def test_medals_one_per_size_class_and_protocol(synth_tables):
    medals = rankings.medals(synth_tables)
    counts = medals.groupby(["size", "protocol", "medal"]).size()
    assert (counts == 1).all()
    assert len(counts) == 3 * 3 * len(rankings.MEDALS)
    for (protocol, size), group in medals.groupby(["protocol", "size"]):
        best = synth_tables[protocol].query("size == @size").nsmallest(3, "rank")
        assert list(group["model"] + group["loss"]) == list(best["model"] + best["loss"])
        assert list(group["rank"]) == sorted(group["rank"])


def test_spearman_matrices_symmetric_unit_diagonal_in_condition_order(synth_cells):
    for corr in stats.spearman_by_protocol(synth_cells).values():
        assert list(corr.index) == list(corr.columns) == list(DROP)
        np.testing.assert_allclose(corr.to_numpy(), corr.to_numpy().T)
        np.testing.assert_allclose(np.diag(corr.to_numpy()), 1.0)
    sub = synth_cells[synth_cells["protocol"] == "fft50"]
    wide = sub.pivot(index=["dataset", "model", "loss"], columns="condition", values="accuracy")
    expected = scipy_stats.spearmanr(wide["clean"], wide["common"]).statistic
    assert stats.spearman(sub).loc["clean", "common"] == pytest.approx(expected)


def test_mac_overall_and_per_group(synth_cells):
    mac = stats.mac(synth_cells)
    overall = mac[(mac["factor"] == "all") & (mac["protocol"] == "fft50")]["mac"].iloc[0]
    corr = stats.spearman(synth_cells[synth_cells["protocol"] == "fft50"]).to_numpy()
    assert overall == pytest.approx(np.abs(corr[~np.eye(5, dtype=bool)]).mean())
    assert set(mac["factor"]) == {"all", *data.FACTORS}
    assert mac["mac"].dropna().between(0, 1).all()


def test_proxy_is_spearman_of_score_sums(synth_tables):
    proxy = stats.proxy(synth_tables)
    assert set(proxy["protocol"]) == {"fft5", "lp50"} and set(proxy["loss"]) == {"all", "classic_at", "trades"}
    pairs = stats.proxy_pairs(synth_tables, "lp50")
    row = proxy.query("protocol == 'lp50' and loss == 'all'").iloc[0]
    assert row["n_configurations"] == len(pairs) == len(MODELS) * 2
    assert row["rho"] == pytest.approx(scipy_stats.spearmanr(pairs["score_sum"], pairs["score_sum_reference"]).statistic)


def check_odds(odds: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> None:
    """Each row's wins recounted from the rankings, and its p from scipy's Fisher test."""
    for row in odds.itertuples():
        table = tables[row.protocol].pivot(index="model", columns="loss", values="score_sum")
        sizes = tables[row.protocol].drop_duplicates("model").set_index("model")["size"]
        inside = table[sizes.reindex(table.index) == row.size]
        assert row.a_wins == (inside[row.loss_a] > inside[row.loss_b]).sum()
        assert row.b_wins == (inside[row.loss_a] < inside[row.loss_b]).sum()
        assert row.a_wins + row.b_wins + row.ties == row.n_backbones == len(inside)
        expected = scipy_stats.fisher_exact([[row.a_wins, row.b_wins], [row.rest_a_wins, row.rest_b_wins]])
        assert row.p == pytest.approx(expected.pvalue)


def test_odds_of_two_losses_counts_and_fisher(synth_tables):
    odds = stats.odds(synth_tables)
    assert len(odds) == 3 * 3
    assert set(zip(odds["loss_a"], odds["loss_b"])) == {("classic_at", "trades")}
    check_odds(odds, synth_tables)


@pytest.mark.slow  # 30 Tukey tests: statsmodels integrates each critical value and p-value numerically
def test_effects_tables(synth_tables):
    main, crossed = stats.main_effects(synth_tables), stats.interactions(synth_tables)
    for protocol, table in synth_tables.items():
        for factor in data.FACTORS:
            rows = main[(main["protocol"] == protocol) & (main["factor"] == factor)]
            assert rows["n"].sum() == len(table)
            means = table.groupby(factor)["borda"].mean()
            assert dict(zip(rows["level"], rows["mean_borda"])) == pytest.approx(means.to_dict())
    assert len(crossed.groupby(["protocol", "factor_a", "factor_b"])) == 3 * 6
    tested = crossed["anova_p"].notna() & (crossed["n"] >= 2)  # single configurations are not compared
    assert tested.any() and (crossed.loc[tested, "tukey"] != "").all()
    assert (crossed.loc[crossed["n"] < 2, "tukey"] == "").all()


def test_bootstrap_intervals_from_per_example_results(synth_root, synth_tables):
    long = load(SYNTH, synth_root)
    reps = bootstrap.replicates(long, synth_root / SYNTH, n_resamples=200)
    assert len(reps) == long["cell_id"].nunique()
    cis = bootstrap.cell_intervals(reps).merge(long[["protocol", "dataset", "model", "loss", "condition", "accuracy"]])
    assert (cis["ci_low"] <= cis["accuracy"] + 1e-12).all() and (cis["accuracy"] <= cis["ci_high"] + 1e-12).all()
    again = bootstrap.cell_intervals(bootstrap.replicates(long, synth_root / SYNTH, n_resamples=200))
    pd.testing.assert_frame_equal(bootstrap.cell_intervals(reps), again)  # seeded
    table = synth_tables["fft50"]
    conf = bootstrap.configuration_intervals(reps, table, list(DATASETS)).merge(table)
    assert len(conf) == len(table)
    assert ((conf["clean_low"] <= conf["mean_clean"] + 1e-12) & (conf["mean_clean"] <= conf["clean_high"] + 1e-12)).all()
    assert ((conf["robust_low"] <= conf["mean_robust"] + 1e-12) & (conf["mean_robust"] <= conf["robust_high"] + 1e-12)).all()


def test_bootstrap_resamples_scores_when_examples_have_them(synth_root, tmp_path):
    """Expected robustness gives each example a share of the grid (its score), not a hit or miss:
    the bootstrap resamples scores. Every example scoring 5/8 (none correct everywhere) makes
    every replicate 5/8; a file of hits and misses alone (before scores existed) still works."""
    long = load(SYNTH, synth_root)
    cell = long[long["condition"] == "clean"].iloc[[0]].assign(condition="expected_linf", accuracy=5 / 8)
    cell_dir = tmp_path / "cells" / cell["cell_id"].iloc[0]
    cell_dir.mkdir(parents=True)
    n = 40
    pq.write_table(pa.table({"condition": ["expected_linf"] * n, "index": list(range(n)), "correct": [False] * n,
                             "score": [5 / 8] * n}), cell_dir / EXAMPLES_FILE)
    (frame,) = bootstrap.replicates(cell, tmp_path, n_resamples=50).values()
    assert np.allclose(frame["expected_linf"], 5 / 8)
    pq.write_table(pa.table({"condition": ["clean"] * n, "index": list(range(n)), "correct": [True] * n}),
                   cell_dir / EXAMPLES_FILE)
    (frame,) = bootstrap.replicates(cell, tmp_path, n_resamples=50).values()
    assert (frame["clean"] == 1.0).all()


def test_unreadable_per_example_results_are_named_and_skipped(synth_root, tmp_path):
    long = load(SYNTH, synth_root)
    cell_id = long["cell_id"].iloc[0]
    broken = tmp_path / "cells" / cell_id
    broken.mkdir(parents=True)
    (broken / EXAMPLES_FILE).write_bytes(b"not parquet")
    with pytest.warns(AnalysisWarning, match=cell_id):
        assert bootstrap.replicates(long, tmp_path, n_resamples=10) == {}


# --- figures -------------------------------------------------------------------------------------

def test_heatmap_labels_follow_the_matrix(synth_cells):
    corr = stats.spearman(synth_cells[synth_cells["protocol"] == "fft5"])
    shuffled = corr.loc[["common", "l1", "clean", "linf", "l2"], ["l2", "clean", "common", "linf", "l1"]]
    fig = figures.heatmap(shuffled, "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [data.label("condition", c) for c in shuffled.columns]
    assert [t.get_text() for t in ax.get_yticklabels()] == [data.label("condition", c) for c in shuffled.index]
    np.testing.assert_allclose(ax.images[0].get_array(), shuffled.to_numpy())


def test_scatter_draws_one_point_per_configuration(synth_tables):
    for table in synth_tables.values():
        fig = figures.scatter(table)
        assert figures.plotted_points(fig) == len(table)
    pairs = {p: stats.proxy_pairs(synth_tables, p) for p in ("fft5", "lp50")}
    fig = figures.proxy_scatter(pairs, stats.proxy(synth_tables))
    assert figures.plotted_points(fig) == sum(len(p) for p in pairs.values())


def is_image(path: Path) -> bool:
    head = path.read_bytes()[:8]
    return path.stat().st_size > 1000 and head.startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF")


def run_figures(overrides: list[str], out: Path) -> int:
    return report.figures_command(argparse.Namespace(overrides=overrides, out=str(out)))


NO_HISTORIES = "skipped: no per-epoch histories"


def skipped_sections(printed: str) -> list[str]:
    """The report's skip notes, each cut to its reason's first words."""
    return [line[line.index("skipped"):][:len(NO_HISTORIES)] for line in printed.splitlines() if "skipped" in line]


@pytest.mark.slow
def test_figures_command_on_the_synthetic_study(synth_root, tmp_path, capsys):
    out = tmp_path / "figs"
    assert run_figures([f"study={SYNTH}", f"paths.results={synth_root}"], out) == 0
    printed = capsys.readouterr().out
    assert skipped_sections(printed) == [NO_HISTORIES] and "figures: wrote" in printed  # made-up cells
    tables = out / "tables"
    for protocol in ("fft50", "fft5", "lp50"):
        for ext in ("csv", "md", "tex"):
            assert (tables / f"ranking_{protocol}.{ext}").stat().st_size > 0
        ranking = pd.read_csv(tables / f"ranking_{protocol}.csv")
        assert ranking[list(figures.INTERVALS)].notna().all().all()  # every cell has per-example results
        assert (ranking["clean_low"] <= ranking["mean_clean"]).all() and (ranking["mean_clean"] <= ranking["clean_high"]).all()
        corr = pd.read_csv(tables / f"spearman_{protocol}.csv", index_col=0)
        assert list(corr.columns) == list(corr.index) == list(DROP)
        for name in ("scatter", "radar", "spearman", "main_effects", "interactions"):
            assert all(is_image(out / "plots" / f"{name}_{protocol}.{ext}") for ext in ("png", "pdf"))
    for name in ("medals", "proxy", "odds", "main_effects", "interactions", "mac", "accuracy_ci"):
        assert len(pd.read_csv(tables / f"{name}.csv")) > 0
    assert all(is_image(out / "plots" / f"{name}.{ext}") for name in ("proxy", "odds") for ext in ("png", "pdf"))
    page = (out / "report.html").read_text()
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert all(f'src="plots/{name}"' in page for name in plots)
    assert "percentile intervals" in page


@pytest.mark.slow
def test_figures_on_a_study_lacking_levels_skips_with_reasons(tmp_path, capsys):
    """The demo's shape: one dataset, one size class; the rankings still work."""
    root = tmp_path / "results"
    planned = plan(["study=demo"])
    for cell in planned.cells:
        cell_dir = cell.directory(root / "demo")
        write_config(cell, cell_dir, "demo")
        acc = 0.3 + 0.1 * (cell.loss == "trades") + 0.05 * (cell.model == planned.cells[0].model)
        write_rows(cell_dir / ROWS_FILE, [
            result_row(cell, c, study="demo", n_examples=200, n_correct=round(acc * 200), accuracy=acc, source="run")
            for c in DROP])
    out = tmp_path / "figs"
    assert run_figures(["study=demo", f"paths.results={root}"], out) == 0
    printed = capsys.readouterr().out
    assert "skipped: no odds ratio to plot" in printed
    assert "size: not tested" in printed
    ranking = pd.read_csv(out / "tables" / "ranking_fft50.csv")
    assert len(ranking) == len(planned.cells) // 3
    assert "clean_low" not in ranking  # no per-example results, no intervals
    assert "without confidence intervals" in (out / "report.html").read_text()


def test_figures_command_rejects_unknown_keys(tmp_path):
    with pytest.raises(RFTBenchError, match="valid choices"):
        run_figures(["studdy=x"], tmp_path)


# --- a study's own losses: three, one; flagged cells ----------------------------------------------

LOSSES3 = ("classic_at", "trades", "mart")  # mart: a loss no analysis code names
SMALL_MODEL = "deit_tiny_patch16_224.fb_in1k"


def losses_long(losses: tuple[str, ...] = LOSSES3, protocols: tuple[str, ...] = ("fft50", "lp50"),
                models: tuple[str, ...] = MODELS) -> pd.DataFrame:
    """A long table (no cell directories) of `models` x DATASETS x `protocols` x `losses`. In each
    size class the first model is clearly the best, so its configurations take the medals; each
    loss's advantage is drawn per size class, so the losses win against each other unevenly."""
    rng = np.random.default_rng(1)
    sizes = data.model_metadata(models)["size"]
    quality = {"small": 0.5, "medium": 0.65, "large": 0.8}
    step = {model: -0.1 * list(sizes[sizes == size].index).index(model) for model, size in sizes.items()}
    advantage = {(loss, size): rng.normal(0, 0.02) for loss in losses for size in quality}
    rows = []
    for protocol, dataset, model, loss in itertools.product(protocols, DATASETS, models, losses):
        base = quality[sizes[model]] + step[model] + advantage[loss, sizes[model]] + rng.normal(0, 0.005)
        rows += [{"cell_id": f"{protocol}-{dataset}-{model}-{loss}", "protocol": protocol, "dataset": dataset,
                  "model": model, "loss": loss, "condition": condition,
                  "accuracy": float(np.clip(base * factor + rng.normal(0, 0.005), 0, 1))}
                 for condition, factor in DROP.items()]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def three_losses() -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    cells = data.prepare(losses_long())
    return cells, rankings.rankings(cells)


def test_ordered_puts_the_known_values_first_then_the_others_as_they_appear():
    assert data.ordered(["mart", "trades", "zeta", "classic_at", "mart"], ["classic_at", "trades"]) == \
        ["classic_at", "trades", "mart", "zeta"]


def test_labels_come_from_the_options_study_name_else_the_name():
    assert data.label("loss", "classic_at") == load_option("loss", "classic_at")["study_name"]
    assert data.label("protocol", "lp50") == load_option("protocol", "lp50")["study_name"]
    assert data.label("loss", "no_such_loss") == "no_such_loss"
    assert data.label("dataset", "uc_merced") == "uc_merced"  # datasets and models keep their names


def test_a_third_loss_is_ranked_medalled_and_tested_like_the_others(three_losses):
    cells, tables = three_losses
    assert data.losses(cells) == list(LOSSES3)  # the conf's known losses first, then the new one
    for table in tables.values():
        assert len(table) == len(MODELS) * len(LOSSES3) and set(table["loss"]) == set(LOSSES3)
    assert set(rankings.medals(tables)["loss"]) == set(LOSSES3)
    main = stats.main_effects(tables, factors=("loss",))
    for protocol in tables:
        rows = main[main["protocol"] == protocol]
        assert list(rows["level"]) == list(LOSSES3) and rows["anova_p"].notna().all() and (rows["tukey"] != "").all()
    assert set(stats.proxy(tables)["loss"]) == {"all", *LOSSES3}


def test_odds_compare_every_pair_of_the_study_losses(three_losses):
    _, tables = three_losses
    odds = stats.odds(tables)
    pairs = list(itertools.combinations(LOSSES3, 2))
    assert list(dict.fromkeys(zip(odds["loss_a"], odds["loss_b"]))) == pairs
    assert len(odds) == len(pairs) * len(tables) * 3  # x protocols x size classes
    check_odds(odds, tables)


def test_figures_show_every_loss(three_losses):
    _, tables = three_losses
    table = tables["fft50"]
    scatter = figures.scatter(table)
    legend = [text.get_text() for text in scatter.axes[0].get_legend().get_texts()]
    assert [t for t in legend if t.startswith("loss: ")] == [f"loss: {data.label('loss', l)}" for l in LOSSES3]
    assert figures.plotted_points(scatter) == len(table)
    odds = figures.odds_plot(stats.odds(tables))
    titles = [ax.get_title() for ax in odds.axes]
    assert len(titles) == 3 and all(data.label("loss", a) in t and data.label("loss", b) in t
                                    for t, (a, b) in zip(titles, itertools.combinations(LOSSES3, 2)))
    bars = figures.effect_bars(stats.main_effects({"fft50": table}, factors=("loss",)), "t")
    assert [t.get_text() for t in bars.axes[0].get_xticklabels()] == [data.label("loss", l) for l in LOSSES3]


def test_with_one_loss_the_odds_are_skipped_with_the_reason():
    tables = rankings.rankings(data.prepare(losses_long(("trades",))))
    with pytest.raises(data.Skip, match="two or more; the study has 1: trades"):
        stats.odds(tables)


def write_flags(study_dir: Path, text: str) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / data.FLAGS_FILE).write_text(text)


def test_flagged_cells_mark_their_configurations_without_dropping_them(three_losses, tmp_path):
    cells, tables = three_losses
    write_flags(tmp_path, "dataset,model,loss,protocol,flag\n"
                          f",{SMALL_MODEL},,lp50,published LP-50 numbers at chance: the weights did not load\n")
    flagged = data.flagged_cells(cells, data.load_flags(tmp_path))
    assert len(flagged) == len(DATASETS) * len(LOSSES3) and set(flagged["model"]) == {SMALL_MODEL}
    marked = rankings.rankings(cells, flagged)
    for protocol, table in marked.items():
        assert len(table) == len(tables[protocol])  # marked, not dropped
        expected = {(SMALL_MODEL, loss) for loss in LOSSES3} if protocol == "lp50" else set()
        assert set(map(tuple, table.loc[table["flagged"], ["model", "loss"]].to_numpy())) == expected
    assert not any(table["flagged"].any() for table in tables.values())  # no flags file, nothing marked
    assert data.load_flags(tmp_path / "elsewhere").empty


def test_a_flag_matching_no_cell_is_named(three_losses, tmp_path):
    write_flags(tmp_path, "dataset,model,loss,protocol,flag\nuc_merced,no_such_model,trades,fft50,typo\n")
    with pytest.warns(AnalysisWarning, match="model=no_such_model"):
        assert data.flagged_cells(three_losses[0], data.load_flags(tmp_path)).empty


def test_a_flags_file_lacking_columns_is_refused(tmp_path):
    write_flags(tmp_path, "dataset,model,flag\nuc_merced,x,y\n")
    with pytest.raises(RFTBenchError, match=r"lacks the columns \['loss', 'protocol'\]"):
        data.load_flags(tmp_path)


def write_report(long: pd.DataFrame, study_dir: Path, out: Path) -> tuple[str, list[str]]:
    """The report of a long table (written under `out`): its page and its printed lines."""
    printed: list[str] = []
    pages = report.Report(out, printed.append)
    report.write(pages, long, data.prepare(long), study_dir)
    summary = report.Overview(states={"done": long["cell_id"].nunique()}, truncated=[], rows=len(long),
                              axes={}, provenance=[], period=None)  # a long table of accuracies only
    return report.render("t", pages.sections, summary), printed


@pytest.mark.slow
def test_report_of_three_losses_with_flagged_cells(tmp_path):
    study_dir, out = tmp_path / "study", tmp_path / "figs"
    write_flags(study_dir, f"dataset,model,loss,protocol,flag\n,{SMALL_MODEL},,lp50,weights did not load\n")
    page, printed = write_report(losses_long(), study_dir, out)
    assert skipped_sections("\n".join(printed)) == [NO_HISTORIES]  # a long table has no learning curves
    assert "Flagged cells" in page and len(pd.read_csv(out / "tables" / "flagged_cells.csv")) == len(DATASETS) * 3
    assert pd.read_csv(out / "tables" / "ranking_lp50.csv")["flagged"].sum() == len(LOSSES3)
    for name in ("ranking_fft50", "ranking_lp50", "medals"):
        assert set(pd.read_csv(out / "tables" / f"{name}.csv")["loss"]) == set(LOSSES3)
    main = pd.read_csv(out / "tables" / "main_effects.csv")
    assert set(main.loc[main["factor"] == "loss", "level"]) == set(LOSSES3)
    odds = pd.read_csv(out / "tables" / "odds.csv")
    assert len(odds.groupby(["loss_a", "loss_b"])) == 3
    assert all(is_image(out / "plots" / f"{name}.png") for name in ("odds", "scatter_lp50", "main_effects_fft50"))


@pytest.mark.slow
def test_report_of_one_loss_says_why_it_compares_no_losses(tmp_path):
    one_per_size = ("regnetx_004.pycls_in1k", "convnext_tiny.fb_in1k", "convnext_base.fb_in22k")  # no Tukey to run
    page, printed = write_report(losses_long(("trades",), models=one_per_size), tmp_path / "study", tmp_path / "figs")
    assert any("skipped: comparing losses needs two or more; the study has 1: trades" in line for line in printed)
    assert "the study has 1: trades" in page and "Flagged cells" not in page


def test_figures_out_at_a_file_is_a_clear_error(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("keep")
    for out in (taken, taken / "figs"):
        assert main(["figures", f"study={SYNTH}", f"paths.results={tmp_path}", "--out", str(out)]) == 2
        printed = capsys.readouterr().err
        assert f"--out {out}" in printed and "a file" in printed and "Traceback" not in printed
    assert taken.read_text() == "keep"


# --- the imported published table ---------------------------------------------------------------

@pytest.mark.slow
def test_rankings_on_the_published_table(published_cells, published_tables):
    assert len(published_cells) == 7200
    for protocol, table in published_tables.items():
        assert len(table) == 80 and not table.duplicated(["model", "loss"]).any()
        assert sorted(table["rank"]) == list(range(1, 81))
        assert rankings.max_borda(published_cells, table) == 2400
        assert table["borda"].between(30, 2400).all()
        assert table["borda"].sum() == pytest.approx(30 * 80 * 81 / 2)
        table_sum = published_cells[published_cells["protocol"] == protocol].groupby(["model", "loss"])["accuracy"].sum()
        np.testing.assert_allclose(table.set_index(["model", "loss"])["score_sum"], table_sum.reindex(table.set_index(["model", "loss"]).index))
    medals = rankings.medals(published_tables)
    assert (medals.groupby(["size", "protocol", "medal"]).size() == 1).all() and len(medals) == 27
    for corr in stats.spearman_by_protocol(published_cells).values():
        np.testing.assert_allclose(corr.to_numpy(), corr.to_numpy().T)
        np.testing.assert_allclose(np.diag(corr.to_numpy()), 1.0)


@pytest.mark.slow
def test_degenerate_flag_on_the_published_table(published_cells, published_tables):
    bad = rankings.degenerate_cells(published_cells)
    assert (bad["accuracy"] < rankings.DEGENERATE_FACTOR * bad["chance"]).all()
    for protocol, table in published_tables.items():
        flagged = set(map(tuple, table.loc[table["degenerate"], ["model", "loss"]].to_numpy()))
        assert flagged == set(map(tuple, bad.loc[bad["protocol"] == protocol, ["model", "loss"]].to_numpy()))


@pytest.mark.slow
def test_figures_command_on_the_published_table(published_root, tmp_path, capsys):
    out = tmp_path / "figs"
    start = time.perf_counter()
    assert run_figures([f"study={DEFAULT_STUDY}", f"paths.results={published_root}"], out) == 0
    elapsed = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert skipped_sections(printed) == [NO_HISTORIES]  # an imported study has no learning curves
    page = (out / "report.html").read_text()
    assert "no per-example results" in page
    assert ("Flagged cells" in page) == (published_root / DEFAULT_STUDY / data.FLAGS_FILE).exists()
    pngs = list((out / "plots").glob("*.png"))
    assert len(pngs) == len(list((out / "plots").glob("*.pdf"))) >= 17 and all(map(is_image, pngs))
    for protocol in ("fft50", "fft5", "lp50"):
        ranking = pd.read_csv(out / "tables" / f"ranking_{protocol}.csv")
        assert len(ranking) == 80 and ranking["borda"].between(30, 2400).all()
    print(f"figures on the published study: {elapsed:.1f} s")
