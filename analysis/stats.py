"""The study's statistics over rankings and cells: correlations between conditions, how well the
cheap protocols predict the expensive one, which loss beats which per size class (pairwise over
the study's losses), and factor effects on the Borda score (one-way ANOVA, Tukey HSD with
compact letters).

Library statistics only: scipy (spearmanr, f_oneway, fisher_exact, odds_ratio), pandas'
Spearman correlation matrix, statsmodels' pairwise_tukeyhsd.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multicomp import pairwise_tukeyhsd

from analysis.data import CELL, FACTORS, Skip, conditions, levels, losses, protocols
from analysis.letters import compact_letters
from benchmark.study import load_option, options

ALPHA = 0.05


def spearman(cells: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation between conditions over the given cells (rows, columns: conditions)."""
    order = conditions(cells)
    wide = cells.pivot(index=list(CELL), columns="condition", values="accuracy")[order].dropna()
    if len(order) < 2 or len(wide) < 3:
        raise Skip(f"a correlation needs 2+ conditions and 3+ complete cells; got {order} and {len(wide)} cells")
    corr = wide.corr(method="spearman")
    corr.index.name, corr.columns.name = "condition", None
    return corr


def spearman_by_protocol(cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {protocol: spearman(cells[cells["protocol"] == protocol]) for protocol in protocols(cells)}


def mean_abs_correlation(corr: pd.DataFrame) -> float:
    """Mean |rho| over the off-diagonal entries: how much the conditions agree overall."""
    values = corr.to_numpy()
    return float(np.nanmean(np.abs(values[~np.eye(len(values), dtype=bool)])))


def mac(cells: pd.DataFrame, factors: tuple[str, ...] = FACTORS) -> pd.DataFrame:
    """MAC per protocol (and over all protocols), overall and per level of each factor."""
    rows = []
    scopes = [(p, cells[cells["protocol"] == p]) for p in protocols(cells)] + [("all", cells)]
    for protocol, sub in scopes:
        groups = [("all", "all", sub)] + [
            (factor, level, sub[sub[factor] == level]) for factor in factors for level in levels(sub, factor)
        ]
        for factor, level, group in groups:
            n_cells = group[list(CELL)].drop_duplicates().shape[0]
            try:
                value = mean_abs_correlation(spearman(group))
            except Skip:
                value = np.nan
            rows.append({"protocol": protocol, "factor": factor, "level": level, "n_cells": n_cells, "mac": value})
    return pd.DataFrame(rows)


def reference_protocol(protocols: list[str]) -> str:
    """The most expensive of `protocols`, the one the cheap ones should predict. By each one's
    conf/protocol option: training the backbone costs more than probing, then more epochs cost
    more (on a tie, the first in order)."""
    known = [p for p in protocols if p in options("protocol")]
    if not known:
        raise Skip(f"the proxy analysis needs a protocol with a conf/protocol option (to tell which is the most "
                   f"expensive); protocols present: {protocols}")
    return max(known, key=_cost)


def _cost(protocol: str) -> tuple[bool, int]:
    option = load_option("protocol", protocol)
    return bool(option["train_backbone"]), option["epochs"]


def proxy(tables: dict[str, pd.DataFrame], reference: str | None = None) -> pd.DataFrame:
    """Spearman rho (and p) between each cheap protocol's per-configuration score_sum and the
    reference protocol's (None: `reference_protocol`), over all configurations and per loss."""
    reference = reference or reference_protocol(list(tables))
    if reference not in tables:
        raise Skip(f"the proxy analysis needs the reference protocol {reference!r}; protocols present: {list(tables)}")
    cheap = [p for p in tables if p != reference]
    if not cheap:
        raise Skip(f"the proxy analysis needs a protocol besides {reference!r}; only {reference!r} is present")
    rows = []
    for protocol in cheap:
        paired = proxy_pairs(tables, protocol, reference)
        for loss, sub in [("all", paired), *((loss, paired[paired["loss"] == loss]) for loss in losses(paired))]:
            rho, p = stats.spearmanr(sub["score_sum"], sub["score_sum_reference"]) if len(sub) >= 3 else (np.nan, np.nan)
            rows.append({"protocol": protocol, "reference": reference, "loss": loss,
                         "n_configurations": len(sub), "rho": rho, "p": p})
    return pd.DataFrame(rows)


def proxy_pairs(tables: dict[str, pd.DataFrame], protocol: str, reference: str | None = None) -> pd.DataFrame:
    """The configurations ranked under both protocols (`reference` None: `reference_protocol`),
    with both score_sums; `degenerate` if under either."""
    reference = reference or reference_protocol(list(tables))
    columns = ["model", "loss", "score_sum", "degenerate"]
    pairs = tables[protocol][columns].merge(tables[reference][columns], on=["model", "loss"], suffixes=("", "_reference"))
    pairs["degenerate"] = pairs["degenerate"] | pairs.pop("degenerate_reference")
    return pairs


def odds(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per protocol x pair of the study's losses (A, B) x size class: on how many backbones A
    beats B on score_sum, and whether that differs between this size class and the others.

    Fisher's exact test (two-sided) on the 2x2 table [[A wins, B wins] in this size class,
    [the same] in the protocol's other size classes]; the odds ratio is (A wins / B wins in the
    class) / (the same elsewhere), with the exact conditional 95% interval. A backbone counts
    for a pair when it was trained with both losses; tied backbones are left out.
    """
    # One order of the losses for every protocol, so that a pair reads the same way in each.
    order = losses(pd.concat([table[["loss"]] for table in tables.values()])) if tables else []
    rows = []
    for protocol, table in tables.items():
        scores = table.pivot(index="model", columns="loss", values="score_sum")
        size = table.drop_duplicates("model").set_index("model")["size"]
        for a, b in itertools.combinations([loss for loss in order if loss in scores.columns], 2):
            rows += _pair_odds(protocol, a, b, scores[[a, b]].dropna(), size)
    if not rows:
        if len(order) < 2:
            raise Skip(f"comparing losses needs two or more; the study has {len(order)}: {', '.join(order) or 'none'}")
        raise Skip(f"no backbone was trained with two of the losses {order} under one protocol")
    return pd.DataFrame(rows)


def _pair_odds(protocol: str, a: str, b: str, scores: pd.DataFrame, size: pd.Series) -> list[dict]:
    """The rows of one pair of losses under one protocol, one per size class."""
    size = size.reindex(scores.index)
    a_wins, b_wins = scores[a] > scores[b], scores[a] < scores[b]
    rows = []
    for level in levels(size.to_frame(), "size"):
        inside = size == level
        counts = [[int(a_wins[inside].sum()), int(b_wins[inside].sum())],
                  [int(a_wins[~inside].sum()), int(b_wins[~inside].sum())]]
        rows.append({"protocol": protocol, "loss_a": a, "loss_b": b, "size": level, "n_backbones": int(inside.sum()),
                     "a_wins": counts[0][0], "b_wins": counts[0][1], "ties": int(inside.sum()) - sum(counts[0]),
                     "rest_a_wins": counts[1][0], "rest_b_wins": counts[1][1], **_fisher(counts)})
    return rows


def _fisher(counts: list[list[int]]) -> dict[str, float]:
    if min(sum(counts[0]), sum(counts[1])) == 0:  # one row empty: no comparison to make
        return {"odds_ratio": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p": np.nan}
    odds, p = stats.fisher_exact(counts)
    low, high = stats.contingency.odds_ratio(counts, kind="conditional").confidence_interval(1 - ALPHA)
    return {"odds_ratio": odds, "ci_low": low, "ci_high": high, "p": p}


def main_effects(tables: dict[str, pd.DataFrame], factors: tuple[str, ...] = FACTORS) -> pd.DataFrame:
    """Mean Borda per level of each factor, per protocol, with ANOVA p and Tukey letters."""
    return _effects([(table, [factor], protocol) for protocol, table in tables.items() for factor in factors])


def interactions(tables: dict[str, pd.DataFrame], factors: tuple[str, ...] = FACTORS) -> pd.DataFrame:
    """Mean Borda per pair of levels of each pair of factors, per protocol (one-way over the
    combined levels), with ANOVA p and Tukey letters."""
    pairs = list(itertools.combinations(factors, 2))
    return _effects([(table, list(pair), protocol) for protocol, table in tables.items() for pair in pairs])


def _effects(tasks: list[tuple[pd.DataFrame, list[str], str]]) -> pd.DataFrame:
    if not tasks:
        raise Skip("no ranking (or no factor) to test effects on")
    return pd.DataFrame([row for task in tasks for row in _effect(*task)])


def _effect(table: pd.DataFrame, factors: list[str], protocol: str) -> list[dict]:
    """Rows of one factor (or pair of factors, crossed): per level n, mean and sd of Borda, the
    ANOVA p-value and Tukey letters."""
    frame = table.dropna(subset=factors)
    samples = {}
    for combo in itertools.product(*(levels(frame, f) for f in factors)):
        values = frame.loc[(frame[factors] == list(combo)).all(axis=1), "borda"].to_numpy()
        if len(values):
            samples[combo] = values
    p, letters, note = _tests({" × ".join(combo): values for combo, values in samples.items()})
    names = {"factor": factors[0]} if len(factors) == 1 else {"factor_a": factors[0], "factor_b": factors[1]}
    rows = []
    for combo, values in samples.items():
        level = {"level": combo[0]} if len(factors) == 1 else {"level_a": combo[0], "level_b": combo[1]}
        rows.append({"protocol": protocol, **names, **level, "n": len(values),
                     "mean_borda": values.mean(), "sd_borda": values.std(ddof=1) if len(values) > 1 else np.nan,
                     "anova_p": p, "tukey": letters.get(" × ".join(combo), ""), "note": note})
    return rows


def _tests(samples: dict[str, np.ndarray]) -> tuple[float, dict[str, str], str]:
    """One-way ANOVA p and Tukey HSD letters over the levels with 2+ observations."""
    testable = {k: v for k, v in samples.items() if len(v) >= 2}
    dropped = sorted(set(samples) - set(testable))
    if len(testable) < 2:
        return np.nan, {}, f"not tested: needs 2+ levels with 2+ configurations each; has {sorted(testable) or 'none'}"
    note = f"levels with one configuration not tested: {', '.join(dropped)}" if dropped else ""
    values = list(testable.values())
    if np.ptp(np.concatenate(values)) == 0:
        return np.nan, {}, "not tested: every configuration has the same Borda score"
    p = float(stats.f_oneway(*values).pvalue)
    names = list(testable)
    codes = np.concatenate([[i] * len(v) for i, v in enumerate(values)])
    tukey = pairwise_tukeyhsd(np.concatenate(values), codes, alpha=ALPHA).summary_frame()
    different = [(names[int(a)], names[int(b)]) for a, b in tukey.loc[tukey["reject"], ["group_t", "group_c"]].itertuples(index=False)]
    best_first = sorted(names, key=lambda k: -testable[k].mean())
    return p, compact_letters(best_first, different), note
