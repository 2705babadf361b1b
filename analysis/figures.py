"""The study's figures, each drawn from exactly one table (the one the report saves beside it),
with its labels taken from that table's own index and columns, never from a parallel list, and
its levels (losses, conditions, size classes) from the table's values: a study with a third loss
draws three.

Figures are built with matplotlib's object API (no pyplot state): they render headless (Agg)
when saved and display inline in a notebook.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from analysis.data import Skip, label, levels, ordered, preferred

POINTS = "configurations"  # gid of the scatter collections holding one point per configuration
SIZES = {"small": 30.0, "medium": 80.0, "large": 160.0}
MARKERS = {"convolutional": "o", "attention": "^", "hybrid": "s"}
EXTRA_MARKERS = ("D", "v", "P", "X")
LOSS_EDGES = ("black", "none", "dimgray", "gold", "tab:cyan")  # the study's losses in order, cycled
DEGENERATE_COLOUR = "red"
INTERVALS = ("clean_low", "clean_high", "robust_low", "robust_high")
FORMATS = ("png", "pdf")
DPI = 110


def _mapping(values: list[str], known: dict[str, object], extra) -> dict[str, object]:
    """`known` styles for known values, then the `extra` styles cycled for the others."""
    spare = itertools.cycle(extra)
    return {v: known[v] if v in known else next(spare) for v in values}


def _palette(values: list[str], name: str = "tab10") -> dict[str, object]:
    colours = colormaps[name].colors
    return {v: colours[i % len(colours)] for i, v in enumerate(values)}


def scatter(ranking: pd.DataFrame) -> Figure:
    """Mean clean vs mean robust accuracy, one point per configuration: marker = type, size =
    size class, colour = pretraining, edge = loss; degenerate ones ringed in red; bootstrap
    intervals as error bars where the ranking has them (clean_/robust_low/high)."""
    if "mean_robust" not in ranking:
        raise Skip("a clean vs robust scatter needs a condition besides clean")
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    ax = fig.add_subplot()
    markers = _mapping(levels(ranking, "type"), MARKERS, EXTRA_MARKERS)
    sizes = _mapping(levels(ranking, "size"), SIZES, (50.0,))
    colours = _palette(levels(ranking, "pretraining"))
    edges = dict(zip(levels(ranking, "loss"), itertools.cycle(LOSS_EDGES)))
    if set(INTERVALS) <= set(ranking.columns):
        bars = ranking.dropna(subset=list(INTERVALS))
        ax.errorbar(bars["mean_clean"], bars["mean_robust"],
                    xerr=[bars["mean_clean"] - bars["clean_low"], bars["clean_high"] - bars["mean_clean"]],
                    yerr=[bars["mean_robust"] - bars["robust_low"], bars["robust_high"] - bars["mean_robust"]],
                    fmt="none", ecolor="0.6", elinewidth=0.8, zorder=1)
    for kind, group in ranking.groupby("type", sort=False):
        ax.scatter(group["mean_clean"], group["mean_robust"], marker=markers[kind],
                   s=group["size"].map(sizes).astype(float), c=[colours[p] for p in group["pretraining"]],
                   edgecolors=[edges[loss] for loss in group["loss"]], linewidths=1.4, zorder=2, gid=POINTS)
    bad = ranking[ranking["degenerate"]]
    ax.scatter(bad["mean_clean"], bad["mean_robust"], s=bad["size"].map(sizes).astype(float) * 3 + 60, facecolors="none",
               edgecolors=DEGENERATE_COLOUR, linewidths=1.2, zorder=3, gid="degenerate")
    robust = [c.removeprefix("mean_") for c in ranking.columns if c.startswith("mean_") and c not in ("mean_clean", "mean_robust")]
    ax.set_xlabel("mean clean accuracy over datasets")
    ax.set_ylabel(f"mean robust accuracy over datasets ({', '.join(label('condition', c) for c in robust)})")
    ax.set_title(f"{label('protocol', ranking['protocol'].iloc[0])}: {len(ranking)} configurations (model × loss)")
    handles = (
        [_handle(marker, label=kind) for kind, marker in markers.items()]
        + [_handle("o", size=s, label=f"size: {name}") for name, s in sizes.items()]
        + [_handle("s", colour=c, label=f"pretraining: {name}") for name, c in colours.items()]
        + [_handle("o", colour="0.8", edge=e, label=f"loss: {label('loss', name)}") for name, e in edges.items()]
        + [_handle("o", colour="none", edge=DEGENERATE_COLOUR, label="degenerate: clean ≈ chance on a dataset")]
    )
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return fig


def _handle(marker: str, colour="0.5", edge="black", size: float = 50.0, label: str = "") -> Line2D:
    return Line2D([], [], linestyle="none", marker=marker, markersize=np.sqrt(size), markerfacecolor=colour,
                  markeredgecolor=edge, label=label)


def radar(winners: pd.DataFrame, title: str) -> Figure:
    """Each dataset's winning configuration over the conditions (the table's condition columns)."""
    conditions = [c for c in winners.columns if c not in ("model", "loss", "score", "degenerate")]
    if len(conditions) < 3:
        raise Skip(f"a radar needs 3+ conditions (fewer make no polygon); the study has {conditions}")
    angles = np.linspace(0, 2 * np.pi, len(conditions), endpoint=False)
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    ax = fig.add_subplot(projection="polar")
    for dataset, row in winners.iterrows():
        values = row[conditions].to_numpy(float)
        flag = " (degenerate: clean ≈ chance)" if row.get("degenerate", False) else ""
        ax.plot(np.append(angles, angles[0]), np.append(values, values[0]), marker="o", markersize=3,
                label=f"{dataset}: {row['model']} / {label('loss', row['loss'])}{flag}")
    ax.set_xticks(angles, labels=[label("condition", c) for c in conditions])
    ax.set_ylim(0, 1)
    ax.set_rlabel_position(np.degrees(angles[1] / 2))  # between two axes, clear of their labels
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), fontsize=8, frameon=False)
    return fig


def heatmap(corr: pd.DataFrame, title: str) -> Figure:
    """A correlation matrix, labelled from its own index (rows) and columns."""
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(corr.to_numpy(float), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(corr.columns)), labels=[label("condition", c) for c in corr.columns])
    ax.set_yticks(range(len(corr.index)), labels=[label("condition", c) for c in corr.index])
    for (i, j), value in np.ndenumerate(corr.to_numpy(float)):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9, color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="Spearman ρ")
    ax.set_title(title)
    return fig


def effect_bars(effects: pd.DataFrame, title: str) -> Figure:
    """Mean Borda (± sd) per level, one panel per factor or pair of factors (bars grouped by the
    first, coloured by the second), with the Tukey letters above the bars."""
    pair = "factor_a" in effects.columns
    panels = list(effects.groupby(["factor_a", "factor_b"] if pair else ["factor"], sort=False))
    cols = min(3, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig = Figure(figsize=(4.6 * cols, 3.8 * rows), layout="constrained")
    for k, (name, panel) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        groups = ordered(panel["level_a" if pair else "level"], preferred(name[0]))
        hues = ordered(panel["level_b"], preferred(name[1])) if pair else [None]
        colours = _palette(hues)
        width = 0.8 / len(hues)
        for i, hue in enumerate(hues):
            bars = panel[panel["level_b"] == hue] if pair else panel
            x = bars["level_a" if pair else "level"].map(groups.index) + (i - (len(hues) - 1) / 2) * width
            sd = bars["sd_borda"].fillna(0.0)
            ax.bar(x, bars["mean_borda"], width=width * 0.95, yerr=sd, capsize=2, color=colours[hue], alpha=0.85)
            for xi, top, letters in zip(x, bars["mean_borda"] + sd, bars["tukey"]):
                ax.annotate(letters, (xi, top), textcoords="offset points", xytext=(0, 2), ha="center",
                            fontsize=7, fontweight="bold")
        names = [label(name[0], g) for g in groups]
        long_labels = sum(map(len, names)) > 40
        ax.set_xticks(range(len(groups)), labels=names, rotation=25 if long_labels else 0,
                      ha="right" if long_labels else "center", fontsize=8)
        ax.margins(y=0.12)
        p = panel["anova_p"].iloc[0]
        ax.set_title(f"{' × '.join(name)}: " + (f"ANOVA p = {p:.2g}" if not np.isnan(p) else "not tested"), fontsize=9)
        ax.set_ylabel("mean Borda score")
        if pair:
            ax.legend(handles=[_handle("s", colour=colours[h], edge=colours[h], label=label(name[1], h)) for h in hues],
                      title=name[1], fontsize=7, title_fontsize=7, frameon=False, ncols=3, loc="upper center",
                      bbox_to_anchor=(0.5, -0.1))
    fig.suptitle(title)
    return fig


def odds_plot(odds: pd.DataFrame, clip: float = 100.0) -> Figure:
    """One panel per pair of losses (A, B): the odds ratio of A beating B (size class vs the
    protocol's other classes) with its exact 95% interval, per size class x protocol, on a log
    axis; 0 and ∞ drawn at the clip."""
    pairs = list(dict.fromkeys(zip(odds["loss_a"], odds["loss_b"])))
    protocols = list(dict.fromkeys(odds["protocol"]))
    sizes = levels(odds, "size")
    colours = _palette(protocols, "Dark2")
    fig = Figure(figsize=(7, len(pairs) * (1.4 + 0.9 * len(sizes))), layout="constrained")
    axes = fig.subplots(len(pairs), 1, sharex=True, squeeze=False)[:, 0]
    offsets = np.linspace(-0.25, 0.25, len(protocols)) if len(protocols) > 1 else [0.0]
    for ax, (a, b) in zip(axes, pairs):
        for offset, protocol in zip(offsets, protocols):
            sub = odds[(odds["protocol"] == protocol) & (odds["loss_a"] == a) & (odds["loss_b"] == b)]
            _odds_points(ax, sub, sizes, offset, colours[protocol], label("protocol", protocol), clip)
        ax.axvline(1.0, color="0.4", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlim(1 / clip / 1.5, clip * 1.5)
        ax.set_yticks(range(len(sizes)), labels=sizes)
        ax.set_title(f"{label('loss', a)} vs {label('loss', b)} on score_sum", fontsize=10)
    axes[0].legend(fontsize=8, frameon=False)
    axes[-1].set_xlabel("odds ratio of the first loss beating the second, size class vs the rest (95% exact CI);\n"
                        "labels: backbones where the first loss wins : where the second wins")
    return fig


def _odds_points(ax: Axes, rows: pd.DataFrame, sizes: list[str], offset: float, colour, name: str, clip: float) -> None:
    """One protocol's odds ratios of one pair of losses, one point per size class (at its row)."""
    y = rows["size"].map(sizes.index) + offset
    ratio = rows["odds_ratio"].clip(1 / clip, clip)
    low, high = rows["ci_low"].clip(1 / clip, clip), rows["ci_high"].clip(1 / clip, clip)
    ax.errorbar(ratio, y, xerr=[ratio - low, high - ratio], fmt="o", color=colour, label=name, capsize=3)
    for xi, yi, row in zip(ratio, y, rows.itertuples()):
        clipped = "" if np.isnan(row.odds_ratio) or 1 / clip < row.odds_ratio < clip else f" (OR = {row.odds_ratio:g})"
        ax.annotate(f"{row.a_wins}:{row.b_wins}{clipped}", (xi, yi), textcoords="offset points",
                    xytext=(0, 4), ha="center", fontsize=7, color=colour)


def proxy_scatter(pairs: dict[str, pd.DataFrame], proxy: pd.DataFrame) -> Figure:
    """Each cheap protocol's score_sum vs the reference's, one point per configuration."""
    fig = Figure(figsize=(5 * len(pairs), 4.5), layout="constrained")
    for k, (protocol, table) in enumerate(pairs.items()):
        ax = fig.add_subplot(1, len(pairs), k + 1)
        colours = _palette(levels(table, "loss"))
        ax.scatter(table["score_sum"], table["score_sum_reference"], c=[colours[v] for v in table["loss"]],
                   s=20, gid=POINTS)
        bad = table[table["degenerate"]]
        ax.scatter(bad["score_sum"], bad["score_sum_reference"], s=80, facecolors="none",
                   edgecolors=DEGENERATE_COLOUR, linewidths=1.0, gid="degenerate")
        stat = proxy[(proxy["protocol"] == protocol) & (proxy["loss"] == "all")].iloc[0]
        ax.set_title(f"{protocol} vs {stat['reference']}: ρ = {stat['rho']:.2f} (p = {stat['p']:.1e})", fontsize=10)
        ax.set_xlabel(f"score_sum under {protocol}")
        ax.set_ylabel(f"score_sum under {stat['reference']}")
        ax.legend(handles=[_handle("o", colour=c, edge=c, label=label("loss", v)) for v, c in colours.items()]
                  + [_handle("o", colour="none", edge=DEGENERATE_COLOUR, label="degenerate under either")],
                  fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
    return fig


CURVE_METRICS = {"val_accuracy": "clean validation accuracy",
                 "val_robust_accuracy": "robust validation accuracy (training attack)"}


def learning_curves(curves: pd.DataFrame, protocol: str) -> Figure:
    """One protocol's learning curves, a panel per metric of CURVE_METRICS the table has values
    for: per loss, the median over its cells at each epoch (line) and the interquartile range
    (band). `curves`: columns protocol, loss, metric, epoch, median, q25, q75, cells."""
    rows = curves[(curves["protocol"] == protocol) & curves["median"].notna()]
    metrics = [m for m in CURVE_METRICS if m in set(rows["metric"])]
    if not metrics:
        raise Skip(f"{protocol}: no learning curve has values")
    fig = Figure(figsize=(5.5 * len(metrics), 4), layout="constrained")
    colours = _palette(levels(rows, "loss"))
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for loss, colour in colours.items():
            line = rows[(rows["metric"] == metric) & (rows["loss"] == loss)].sort_values("epoch")
            n = int(line["cells"].max()) if len(line) else 0
            ax.plot(line["epoch"], line["median"], color=colour, label=f"{label('loss', loss)} ({n} cells)")
            ax.fill_between(line["epoch"], line["q25"], line["q75"], color=colour, alpha=0.2, linewidth=0)
        ax.set_title(f"{label('protocol', protocol)}: {CURVE_METRICS[metric]}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("median over cells (band: interquartile range)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    return fig


def plotted_points(fig: Figure) -> int:
    """How many configuration points a figure draws (collections tagged POINTS)."""
    return sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections if c.get_gid() == POINTS)


def save(fig: Figure, directory: Path, name: str) -> list[Path]:
    """Write the figure as PNG and PDF; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.{fmt}" for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=DPI)
        # The first save solved the layout (in inches, so valid for every format): keep it, rather
        # than solve it again, the slowest part of drawing.
        fig.set_layout_engine("none")
    return paths
