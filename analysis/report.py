"""`rftbench figures study=NAME [--out DIR]`: every table and figure of the study, and one HTML
page showing them all.

Layout of DIR (default `<results root>/<study>/figures`): `tables/` (CSV, plus Markdown and LaTeX
for the paper's tables), `plots/` (PNG and PDF), `report.html` (links to `plots/` relatively).
An output the study lacks the axes or levels for is skipped with the reason printed and shown
in the report; the rest is still written. A study directory holding `flags.csv` (see
`data.load_flags`) gets a "Flagged cells" section, and its rankings mark the flagged configurations.
"""
from __future__ import annotations

import argparse
import contextlib
import html
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import bootstrap, figures, rankings, stats
from analysis.data import (
    CELL,
    CONFIGURATION,
    FLAGS_FILE,
    AnalysisWarning,
    Skip,
    flagged_cells,
    label,
    load_flags,
    losses,
    prepare,
    protocols,
)
from benchmark import arguments, paths, tables
from benchmark.errors import RFTBenchError

PAPER_TABLES = ("csv", "md", "tex")  # formats of the tables the paper prints


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # PNG paths relative to the output dir


class Report:
    """Writes tables and figures under `out` as they are produced and remembers them for the page."""

    def __init__(self, out: Path, log: Callable[[str], None] = print):
        self.out, self.log = out, log
        self.sections: list[Section] = []
        self.files = 0

    @contextlib.contextmanager
    def section(self, title: str) -> Iterator[Section]:
        """A part of the report; a Skip inside it, or a warning, becomes a printed, shown note."""
        section = Section(title)
        self.sections.append(section)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AnalysisWarning)
            try:
                yield section
            except Skip as skip:
                section.notes.append(f"skipped: {skip}")
        section.notes += [str(w.message) for w in caught if issubclass(w.category, AnalysisWarning)]
        for note in section.notes:
            self.log(f"  {title}: {note}")
        self.log(f"{title}: {len(section.tables)} tables, {len(section.plots)} figures "
                 f"in {time.perf_counter() - start:.1f} s")

    def table(self, section: Section, frame: pd.DataFrame, name: str, formats: tuple[str, ...] = ("csv",),
              index: bool = False) -> None:
        directory = self.out / "tables"
        directory.mkdir(parents=True, exist_ok=True)
        writers = {
            "csv": lambda p: frame.to_csv(p, index=index),
            "md": lambda p: p.write_text(frame.to_markdown(index=index, floatfmt=".3f") + "\n"),
            "tex": lambda p: p.write_text(frame.to_latex(index=index, float_format="%.3f", escape=True)),
        }
        for fmt in formats:
            writers[fmt](directory / f"{name}.{fmt}")
            self.files += 1
        section.tables.append((name, frame.reset_index() if index else frame))

    def figure(self, section: Section, fig: Figure, name: str) -> None:
        saved = figures.save(fig, self.out / "plots", name)
        self.files += len(saved)
        section.plots.append(saved[0].relative_to(self.out).as_posix())


def build(study: str, out: Path, results_root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Write every table, figure and the HTML report of `study` under `out`; returns the page."""
    start = time.perf_counter()
    long = tables.load(study, results_root=results_root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AnalysisWarning)
        cells = prepare(long)
    sources = sorted(long["source"].dropna().unique())
    log(f"figures: study {study!r}: {len(long)} rows, {cells[list(CELL)].drop_duplicates().shape[0]} cells, "
        f"protocols {protocols(cells)}, losses {losses(cells)}, sources {sources}")
    for w in caught:
        log(f"  {w.message}")
    report = Report(out, log)
    write(report, long, cells, paths.study_dir(study, results_root))
    page = out / "report.html"
    page.write_text(render(study, report.sections))
    log(f"figures: wrote {report.files + 1} files to {out} in {time.perf_counter() - start:.1f} s; open {page}")
    return page


def write(report: Report, long: pd.DataFrame, cells: pd.DataFrame, study_dir: Path) -> None:
    """Every table and figure, section by section (the order of the page)."""
    flags = load_flags(study_dir)
    flagged = None
    if not flags.empty:
        with report.section("Flagged cells") as section:
            flagged = flagged_cells(cells, flags)
            report.table(section, flagged, "flagged_cells")
            section.notes.append(f"{len(flagged)} cells flagged by {len(flags)} entries of {FLAGS_FILE}: their numbers "
                                 "are kept, and the rankings mark their configurations (`flagged`)")
    with report.section("Rankings") as section:
        reps = bootstrap.replicates(long, study_dir)
        ranked = {p: _with_intervals(t, reps, cells) for p, t in rankings.rankings(cells, flagged).items()}
        for protocol, table in ranked.items():
            report.table(section, table, f"ranking_{protocol}", PAPER_TABLES)
            section.notes.append(f"{protocol}: {len(table)} configurations, Borda max {rankings.max_borda(cells, table)}, "
                                 f"{int(table['degenerate'].sum())} degenerate (clean accuracy < "
                                 f"{rankings.DEGENERATE_FACTOR:g} × chance on some dataset), "
                                 f"{int(table['flagged'].sum())} with a flagged cell")
        n_cells = cells[list(CELL)].drop_duplicates().shape[0]
        if reps:
            report.table(section, bootstrap.cell_intervals(reps), "accuracy_ci")
            section.notes.append(
                f"{len(reps)} of {n_cells} cells have per-example results: {bootstrap.LEVEL:.0%} percentile intervals "
                f"(accuracy_ci; clean_/robust_low/high in the rankings) from a seeded numpy bootstrap "
                f"({bootstrap.N_RESAMPLES} resamples of each cell's test examples)")
        else:
            section.notes.append("no per-example results (imported results keep only accuracies): "
                                 "accuracies are shown without confidence intervals")
    with report.section("Medals") as section:
        report.table(section, rankings.medals(ranked), "medals", ("csv", "tex"))
    with report.section("Clean vs robust accuracy") as section:
        for protocol, table in ranked.items():
            report.figure(section, figures.scatter(table), f"scatter_{protocol}")
    with report.section("Each dataset's winner") as section:
        for protocol in ranked:
            winners = rankings.winners(cells, protocol)
            report.table(section, winners, f"winners_{protocol}", index=True)
            report.figure(section, figures.radar(winners, f"{protocol}: each dataset's winner"), f"radar_{protocol}")
    with report.section("Correlation between conditions") as section:
        for protocol, corr in stats.spearman_by_protocol(cells).items():
            report.table(section, corr, f"spearman_{protocol}", index=True)
            report.figure(section, figures.heatmap(corr, f"{protocol}: Spearman ρ over its cells"), f"spearman_{protocol}")
        report.table(section, stats.mac(cells), "mac")
    with report.section("Cheap protocols as proxies") as section:
        proxy = stats.proxy(ranked)
        report.table(section, proxy, "proxy")
        pairs = {p: stats.proxy_pairs(ranked, p) for p in proxy["protocol"].unique()}
        report.figure(section, figures.proxy_scatter(pairs, proxy), "proxy")
    with report.section("Losses compared per size class") as section:
        odds = stats.odds(ranked)
        report.table(section, odds, "odds")
        pairs = ", ".join(f"{label('loss', a)} vs {label('loss', b)}"
                          for a, b in dict.fromkeys(zip(odds["loss_a"], odds["loss_b"])))
        section.notes.append(f"pairs of losses: {pairs}. A 2×2 table per pair (A, B) × protocol × size class: rows = "
                             "this size class, the protocol's other classes; columns = backbones where A has the "
                             "higher score_sum, where B has (ties left out). Fisher's exact test, two-sided; exact "
                             "conditional 95% interval of the odds ratio")
        if odds["odds_ratio"].isna().all():
            raise Skip("no odds ratio to plot: it compares a size class with the others, and the study has one size class")
        report.figure(section, figures.odds_plot(odds), "odds")
    with report.section("Effects on the Borda score") as section:
        main, crossed = stats.main_effects(ranked), stats.interactions(ranked)
        report.table(section, main, "main_effects")
        report.table(section, crossed, "interactions")
        section.notes += sorted({f"{r.protocol} {r.factor}: {r.note}" for r in main.itertuples() if r.note})
        for protocol in ranked:
            report.figure(section, figures.effect_bars(main[main["protocol"] == protocol],
                                                       f"{protocol}: main effects (Tukey HSD letters)"), f"main_effects_{protocol}")
            report.figure(section, figures.effect_bars(crossed[crossed["protocol"] == protocol],
                                                       f"{protocol}: interactions (Tukey HSD letters)"), f"interactions_{protocol}")


def _with_intervals(ranking: pd.DataFrame, reps: bootstrap.Replicates, cells: pd.DataFrame) -> pd.DataFrame:
    """The ranking with the bootstrap intervals of its mean clean and robust accuracies (empty
    where a configuration's cells lack per-example results; none at all without any)."""
    if not reps:
        return ranking
    protocol = ranking["protocol"].iloc[0]
    datasets = sorted(cells.loc[cells["protocol"] == protocol, "dataset"].unique())
    return ranking.merge(bootstrap.configuration_intervals(reps, ranking, datasets), on=list(CONFIGURATION), how="left")


def render(study: str, sections: list[Section]) -> str:
    """The report as one HTML page: per section its notes, figures and tables."""
    parts = [f"<h1>RFTBench study {html.escape(study)}</h1>", "<ul>"]
    parts += [f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections)]
    parts.append("</ul>")
    for i, section in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{html.escape(section.title)}</h2>')
        parts += [f"<p class=note>{html.escape(note)}</p>" for note in section.notes]
        parts += [f'<a href="{p}"><img src="{p}" alt="{p}"></a>' for p in section.plots]
        for name, frame in section.tables:
            parts.append(f"<h3>{html.escape(name)}</h3><div class=table>"
                         f"{frame.to_html(index=False, float_format=lambda v: f'{v:.3f}', na_rep='', border=0)}</div>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em} img{max-width:100%;display:block;"
             "margin:1em 0} .table{overflow-x:auto;max-height:40em} table{border-collapse:collapse;font-size:.8em}"
             " td,th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right} .note{color:#555}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>RFTBench {html.escape(study)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def figures_command(args: argparse.Namespace) -> int:
    """`rftbench figures [study=NAME] [paths.results=DIR] [--out DIR]`."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the command never opens a window
    study, results_root = arguments.study_and_root(args.overrides)
    out = Path(args.out) if args.out else paths.study_dir(study, results_root) / "figures"
    _check_out(out)
    build(study, out, results_root)
    return 0


def _check_out(out: Path) -> None:
    """Refuse an output path that cannot be a directory (it, or a parent, is a file), before
    anything is read or written."""
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        what = "is a file" if blocking == out else f"is under {blocking}, a file"
        raise RFTBenchError(f"--out {out} {what}; give a directory (it will hold tables/, plots/ and report.html)")
