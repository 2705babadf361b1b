"""Borda rankings of a protocol's configurations (model x loss), medals, degenerate configurations.

Borda score of a configuration: the sum, over every dataset x condition, of its rank among all
configurations of the protocol on that accuracy (ascending, so higher accuracy -> higher rank;
ties take the average rank). Its maximum is n_configurations x n_datasets x n_conditions.
`score_sum` is the sum of the same accuracies. Global rank 1 = highest Borda (equal Borda:
higher score_sum first, then by name, so the ranks are a permutation).

A configuration is marked (never dropped) `degenerate` when its clean accuracy is near chance on
some dataset, and `flagged` when one of its cells is flagged in the study's flags file.
"""
from __future__ import annotations

import warnings

import pandas as pd

from analysis.data import CONFIGURATION, FLAG_COLUMNS, AnalysisWarning, Skip, conditions, levels, protocols

# A cell is degenerate when its clean accuracy is below this multiple of chance (1 / classes):
# such a model barely beats guessing (often it predicts one class), yet it can rank high because
# an attack cannot lower a constant prediction.
DEGENERATE_FACTOR = 2.0
MEDALS = ("gold", "silver", "bronze")
METADATA = ("size", "type", "params_m", "pretraining", "pretraining_data")


def accuracy_matrix(cells: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Accuracies of the protocol's complete configurations: rows (model, loss), columns
    (dataset, condition). Configurations missing a measurement are dropped with a warning."""
    sub = cells[cells["protocol"] == protocol]
    if sub.empty:
        raise Skip(f"no results for protocol {protocol!r}; protocols present: {protocols(cells)}")
    matrix = sub.pivot(index=list(CONFIGURATION), columns=["dataset", "condition"], values="accuracy")
    incomplete = matrix.isna().any(axis=1)
    if incomplete.any():
        names = ", ".join(f"{m}/{l}" for m, l in matrix.index[incomplete])
        warnings.warn(AnalysisWarning(
            f"{protocol}: {int(incomplete.sum())} configurations lack some dataset x condition "
            f"results and are left out of the ranking: {names}"), stacklevel=2)
        matrix = matrix[~incomplete]
    if matrix.empty:
        raise Skip(f"{protocol}: no configuration has results on every dataset x condition")
    return matrix


def ranking(cells: pd.DataFrame, protocol: str, flagged: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per configuration of the protocol, best first (see the module docstring);
    `flagged`: the study's flagged cells (`data.flagged_cells`), if any."""
    matrix = accuracy_matrix(cells, protocol)
    table = pd.DataFrame({
        "borda": matrix.rank(axis=0, method="average", ascending=True).sum(axis=1),
        "score_sum": matrix.sum(axis=1),
    })
    by_condition = matrix.T.groupby(level="condition").mean().T
    order = conditions(cells[cells["protocol"] == protocol])
    for condition in order:
        table[f"mean_{condition}"] = by_condition[condition]
    robust = [c for c in order if c != "clean"]
    if robust:
        table["mean_robust"] = by_condition[robust].mean(axis=1)
    table = table.reset_index()
    table = table.sort_values(["borda", "score_sum", "model", "loss"], ascending=[False, False, True, True])
    table.insert(4, "rank", range(1, len(table) + 1))
    table = table.merge(_configuration_metadata(cells), on=list(CONFIGURATION), how="left")
    table = table.merge(degenerate_configurations(cells, protocol), on=list(CONFIGURATION), how="left")
    table = table.merge(flagged_configurations(cells, protocol, flagged), on=list(CONFIGURATION), how="left")
    table.insert(0, "protocol", protocol)
    return table.reset_index(drop=True)


def rankings(cells: pd.DataFrame, flagged: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """The ranking of every protocol present, in the study's protocol order (`data.protocols`)."""
    out = {}
    for protocol in protocols(cells):
        try:
            out[protocol] = ranking(cells, protocol, flagged)
        except Skip as skip:
            warnings.warn(AnalysisWarning(str(skip)), stacklevel=2)
    return out


def max_borda(cells: pd.DataFrame, table: pd.DataFrame) -> int:
    """The largest possible Borda score of a ranking: n_configurations x n_datasets x n_conditions."""
    sub = cells[cells["protocol"] == table["protocol"].iloc[0]]
    return len(table) * sub["dataset"].nunique() * sub["condition"].nunique()


def _configuration_metadata(cells: pd.DataFrame) -> pd.DataFrame:
    return cells[[*CONFIGURATION, *METADATA]].drop_duplicates(list(CONFIGURATION))


def degenerate_cells(cells: pd.DataFrame, factor: float = DEGENERATE_FACTOR) -> pd.DataFrame:
    """The cells whose clean accuracy is below `factor` x chance (see DEGENERATE_FACTOR)."""
    clean = cells[cells["condition"] == "clean"]
    return clean[clean["accuracy"] < factor * clean["chance"]]


def degenerate_configurations(cells: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Per configuration of the protocol: on how many datasets it is degenerate, and which."""
    sub = cells[(cells["protocol"] == protocol) & (cells["condition"] == "clean")]
    bad = degenerate_cells(sub)
    table = sub[list(CONFIGURATION)].drop_duplicates()
    summary = bad.groupby(list(CONFIGURATION))["dataset"].agg(n_degenerate="size", degenerate_datasets=" ".join)
    table = table.merge(summary.reset_index(), on=list(CONFIGURATION), how="left")
    table["n_degenerate"] = table["n_degenerate"].fillna(0).astype(int)
    table["degenerate_datasets"] = table["degenerate_datasets"].fillna("")
    table["degenerate"] = table["n_degenerate"] > 0
    return table


def flagged_configurations(cells: pd.DataFrame, protocol: str, flagged: pd.DataFrame | None) -> pd.DataFrame:
    """Per configuration of the protocol: whether a cell of it is flagged, and on which datasets."""
    table = cells.loc[cells["protocol"] == protocol, list(CONFIGURATION)].drop_duplicates()
    hits = pd.DataFrame(columns=list(FLAG_COLUMNS)) if flagged is None else flagged[flagged["protocol"] == protocol]
    summary = hits.groupby(list(CONFIGURATION))["dataset"].agg(lambda d: " ".join(dict.fromkeys(d)))
    table = table.merge(summary.rename("flagged_datasets").reset_index(), on=list(CONFIGURATION), how="left")
    table["flagged_datasets"] = table["flagged_datasets"].fillna("")
    table["flagged"] = table["flagged_datasets"] != ""
    return table


def winners(cells: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Per dataset (rows): the configuration with the highest summed accuracy over the conditions
    on it, its accuracy per condition (columns in the study's condition order), and whether
    its clean accuracy there is near chance."""
    matrix = accuracy_matrix(cells, protocol)
    order = conditions(cells[cells["protocol"] == protocol])
    rows = {}
    for dataset in matrix.columns.get_level_values("dataset").unique():
        block = matrix[dataset][order]
        score = block.sum(axis=1)
        best = score.sort_index().idxmax()  # ties: the first configuration by name
        rows[dataset] = {"model": best[0], "loss": best[1], "score": score[best], **block.loc[best]}
    bad = degenerate_cells(cells[cells["protocol"] == protocol])
    flagged = set(zip(bad["dataset"], bad["model"], bad["loss"]))
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "dataset"
    table["degenerate"] = [(d, m, l) in flagged for d, m, l in zip(table.index, table["model"], table["loss"])]
    return table


def medals(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Gold, silver and bronze per size class x protocol: its best configurations by global rank."""
    rows = []
    for protocol, table in tables.items():
        for size in levels(table, "size"):
            best = table[table["size"] == size].nsmallest(len(MEDALS), "rank")
            for medal, (_, row) in zip(MEDALS, best.iterrows()):
                rows.append({"size": size, "protocol": protocol, "medal": medal,
                             **row[["model", "loss", "rank", "borda", "score_sum", "degenerate", "flagged"]]})
    if not rows:
        raise Skip("no ranking to award medals from")
    return pd.DataFrame(rows)
