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
from benchmark.cell import CELLS_DIR
from benchmark.errors import RFTBenchError
from benchmark.history import CHANCE_STANDARD_ERRORS, never_left_chance

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
    page.write_text(render(study, report.sections, overview(long, tables.load_cells(study, results_root))))
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
    with report.section("Learning curves") as section:
        has_cells = (study_dir / CELLS_DIR).is_dir()  # a copied table alone has no histories
        history = tables.history(study_dir.name, study_dir.parent) if has_cells else pd.DataFrame()
        if history.empty:
            raise Skip("no per-epoch histories (imported results, or cells run before histories were kept)")
        axes = tables.load_cells(study_dir.name, study_dir.parent)[["cell_id", *CELL, "num_classes"]]
        curves = _learning_curves(history.merge(axes, on="cell_id"))
        report.table(section, curves, "learning_curves")
        for protocol in curves["protocol"].unique():
            report.figure(section, figures.learning_curves(curves, protocol), f"learning_curves_{protocol}")
        at_chance = never_left_chance(history, axes.dropna(subset=["num_classes"]).set_index("cell_id")["num_classes"]
                                      .astype(int).to_dict())
        report.table(section, axes[axes["cell_id"].isin(at_chance)], "never_left_chance")
        section.notes.append(f"{len(at_chance)} cells never left chance: their clean validation accuracy stayed, at "
                             f"every epoch, at most 1/classes + {CHANCE_STANDARD_ERRORS:g} standard errors of a "
                             "guessing classifier's on their val split (never_left_chance)")
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


def _learning_curves(history: pd.DataFrame) -> pd.DataFrame:
    """Per protocol, loss, validation metric and epoch: the median, quartiles and number of cells
    (backbones x datasets x seeds) of the history rows."""
    metrics = list(figures.CURVE_METRICS)
    long = history.melt(id_vars=["protocol", "loss", "epoch"], value_vars=metrics, var_name="metric")
    grouped = long.groupby(["protocol", "loss", "metric", "epoch"], sort=True)["value"]
    return pd.DataFrame({"median": grouped.median(), "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75),
                         "cells": grouped.count()}).reset_index()


def _with_intervals(ranking: pd.DataFrame, reps: bootstrap.Replicates, cells: pd.DataFrame) -> pd.DataFrame:
    """The ranking with the bootstrap intervals of its mean clean and robust accuracies (empty
    where a configuration's cells lack per-example results; none at all without any)."""
    if not reps:
        return ranking
    protocol = ranking["protocol"].iloc[0]
    datasets = sorted(cells.loc[cells["protocol"] == protocol, "dataset"].unique())
    return ranking.merge(bootstrap.configuration_intervals(reps, ranking, datasets), on=list(CONFIGURATION), how="left")


# Where each summary line of provenance comes from: (label, row column).
PROVENANCE = (("torch", "torch_version"), ("timm", "timm_version"), ("AutoAttack", "autoattack_version"),
              ("Python", "python_version"), ("commit", "git_commit"), ("device", "device"),
              ("precision", "precision"), ("processes", "world_size"), ("host", "host"), ("source", "source"),
              ("source file", "source_file"))
UNRECORDED = "not recorded"
LONG_TEXT = 40  # characters: a longer table cell is cut with an ellipsis (full text on hover)


@dataclass(frozen=True)
class Overview:
    """The page's summary: the collected cells by state, the truncated evaluations, and per
    provenance column of the rows its values with how many cells have each."""

    states: dict[str, int]
    truncated: list[str]  # "<slug>: <truncation>"
    rows: int
    axes: dict[str, int]  # distinct values per axis, conditions included
    provenance: list[tuple[str, list[tuple[str, int]]]]
    period: tuple[str, str] | None  # first start, last finish (None: not recorded)


def overview(long: pd.DataFrame, cell_table: pd.DataFrame) -> Overview:
    """What the summary shows, from the long table and the cell table (benchmark.tables)."""
    truncated = cell_table[cell_table["truncated"].fillna(False).astype(bool)]
    rows = long.assign(git_commit=_commits(long))
    provenance = [(name, _cells_per_value(rows, column)) for name, column in PROVENANCE if column in rows]
    started, finished = long["started_at"].dropna(), long["finished_at"].dropna()
    period = (f"{started.min():%Y-%m-%d %H:%M}", f"{finished.max():%Y-%m-%d %H:%M}") if len(started) and len(finished) else None
    return Overview(states=cell_table["state"].value_counts().to_dict(),
                    truncated=[f"{r.slug}: {r.truncation}" for r in truncated.itertuples()],
                    rows=len(long), axes={axis: long[axis].nunique() for axis in (*CELL, "condition")},
                    provenance=provenance, period=period)


def _commits(long: pd.DataFrame) -> pd.Series:
    """Each row's commit, shortened, marked when the tree had uncommitted changes."""
    dirty = long["git_dirty"].astype("boolean").fillna(False)
    return long["git_commit"].str[:12].where(~dirty, long["git_commit"].str[:12] + " + uncommitted changes")


def _cells_per_value(rows: pd.DataFrame, column: str) -> list[tuple[str, int]]:
    """(value, cells having it), most cells first; a null is 'not recorded'."""
    values = rows[column].astype("string").fillna(UNRECORDED)
    counts = rows.assign(value=values).groupby("value")["cell_id"].nunique()
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def render(study: str, sections: list[Section], summary: Overview) -> str:
    """The report as one self-contained HTML page (inline CSS and script; figures linked from
    plots/): a sticky table of contents, the summary, then per section its notes, figures in a
    grid that fits the width, and tables that scroll in their own box, sortable by a click on a
    column header and filtered by a query (see FILTER_HELP)."""
    toc = ['<a href="#summary">Summary</a>']
    toc += [f'<a href="#s{i}">{html.escape(s.title)} <small>{_counts_label(s)}</small></a>'
            for i, s in enumerate(sections)]
    body = [f"<h1>RFTBench study {html.escape(study)}</h1>", _summary_html(summary)]
    body += [_section_html(i, section) for i, section in enumerate(sections)]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>RFTBench {html.escape(study)}</title>"
            f"<meta name=viewport content='width=device-width'><style>{PAGE_STYLE}</style></head><body>"
            f"<nav id=toc><b>{html.escape(study)}</b>{''.join(toc)}</nav><main>{''.join(body)}</main>"
            f"<script>{PAGE_SCRIPT}</script></body></html>\n")


def _counts_label(section: Section) -> str:
    parts = [f"{n} {what}" for n, what in ((len(section.tables), "tables"), (len(section.plots), "figures")) if n]
    return html.escape(", ".join(parts) or "notes")


def _summary_html(summary: Overview) -> str:
    total = sum(summary.states.values())
    cards = [(f"{total:,}", "cells collected", "")]
    cards += [(f"{n:,}", state, state) for state, n in sorted(summary.states.items(), key=lambda s: -s[1])]
    cards.append((f"{len(summary.truncated):,}", "truncated evaluations", "warn" if summary.truncated else ""))
    cards.append((f"{summary.rows:,}", "rows", ""))
    cards += [(f"{n:,}", "losses" if axis == "loss" else f"{axis}s", "") for axis, n in summary.axes.items()]
    done = summary.states.get("done", 0)
    parts = ["<section id=summary><h2>Summary</h2><div class=cards>"]
    parts += [f"<div class='card {cls}'><b>{value}</b>{html.escape(name)}</div>" for value, name, cls in cards]
    parts.append(f"</div><div class=bar title='{done} of {total} cells done'>"
                 f"<span style='width:{100 * done / max(total, 1):.1f}%'></span></div>")
    parts.append("<p class=note>Cells counted are those with a directory (collected); <code>rftbench status</code> "
                 "also counts the planned cells never launched.</p><table class=prov>")
    unrecorded = [name for name, values in summary.provenance if [v for v, _ in values] == [UNRECORDED]]
    for name, values in summary.provenance:
        if name in unrecorded:
            continue
        shown = ", ".join(f"{html.escape(v)} <small>({n} cells)</small>" for v, n in values[:6])
        more = f", … {len(values) - 6} more" if len(values) > 6 else ""
        parts.append(f"<tr><th>{html.escape(name)}</th><td>{shown}{more}</td></tr>")
    if unrecorded:
        parts.append(f"<tr><th>not recorded</th><td>{html.escape(', '.join(unrecorded))} (no row has them: "
                     "imported rows keep only the measurements)</td></tr>")
    if summary.period:
        parts.append(f"<tr><th>ran</th><td>{summary.period[0]} – {summary.period[1]} (UTC)</td></tr>")
    parts.append("</table>")
    if summary.truncated:
        items = "".join(f"<li>{html.escape(t)}</li>" for t in summary.truncated)
        parts.append(f"<details><summary>{len(summary.truncated)} cells evaluated on fewer examples than their "
                     f"test_size</summary><ul>{items}</ul></details>")
    return "".join(parts) + "</section>"


def _section_html(index: int, section: Section) -> str:
    parts = [f'<section id="s{index}"><h2>{html.escape(section.title)}</h2>']
    parts += [f"<p class='note{' skip' if note.startswith('skipped') else ''}'>{html.escape(note)}</p>"
              for note in section.notes]
    if section.plots:
        parts.append("<div class=figs>")
        parts += [f'<figure><a href="{html.escape(p)}"><img src="{html.escape(p)}" alt="{html.escape(p)}"></a>'
                  f"<figcaption>{html.escape(Path(p).stem)}</figcaption></figure>" for p in section.plots]
        parts.append("</div>")
    parts += [_table_html(name, frame) for name, frame in section.tables]
    return "".join(parts) + "</section>"


def _table_html(name: str, frame: pd.DataFrame) -> str:
    """A table in its scroll box, under a bar with its name, its filter and its row count. A
    numeric cell keeps its exact value in `data-v`, which sorting uses."""
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]) for c in frame]
    integral = [n and bool(((frame[c].dropna() % 1) == 0).all()) for n, c in zip(numeric, frame)]
    head = "".join(f"<th class={'num' if n else 'txt'} title='sort by {html.escape(str(c))}'>{html.escape(str(c))}</th>"
                   for c, n in zip(frame.columns, numeric))
    rows = []
    for values in frame.itertuples(index=False):
        cells = [_cell_html(v, n, i) for v, n, i in zip(values, numeric, integral)]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f"<div class=tbl><div class=tbar><h3>{html.escape(name)}</h3><input type=search "
            f"placeholder='filter rows' title='{html.escape(FILTER_HELP)}'><span class=count>{len(frame)} rows</span>"
            f"</div><div class=box><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            "</div></div>")


def _cell_html(value: object, numeric: bool, integral: bool) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "<td></td>"
    if numeric:
        shown = f"{value:,.0f}" if integral else _number(float(value))
        return f"<td class=num data-v='{float(value)!r}'>{shown}</td>"
    text = str(value)
    title = f" title='{html.escape(text)}'" if len(text) > LONG_TEXT else ""
    return f"<td{title}>{html.escape(text)}</td>"


def _number(value: float) -> str:
    """Three decimals; a tiny non-zero value (a p-value) in scientific notation."""
    return f"{value:.2e}" if value and abs(value) < 5e-4 else f"{value:.3f}"


FILTER_HELP = ("words all match a row (any column); column:text matches in that column; column>number, "
               "column<number and column=value compare (e.g. loss:trades mean_linf>0.5)")
PAGE_STYLE = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,sans-serif;color:#222;display:grid;grid-template-columns:15rem minmax(0,1fr)}
nav{position:sticky;top:0;height:100vh;overflow-y:auto;padding:1rem .8rem;background:#f5f6f8;border-right:1px solid #ddd}
nav b{display:block;margin-bottom:.6rem;word-break:break-all}
nav a{display:block;padding:.25rem .4rem;border-radius:4px;color:#234;text-decoration:none}
nav a:hover,nav a.on{background:#dde5f0}
nav small{color:#778}
main{min-width:0;padding:0 2rem 4rem}
h1{margin:1rem 0 .5rem}
h2{margin:2rem 0 .6rem;padding-top:.8rem;border-top:2px solid #e4e6ea}
section{scroll-margin-top:.5rem}
.note{color:#555;margin:.3rem 0;max-width:75rem}
.skip{color:#8a5a00}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(9rem,1fr));gap:.5rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.4rem .6rem;color:#555}
.card b{display:block;font-size:1.5rem;color:#222}
.card.done b{color:#1a7f37}.card.failed b,.card.warn b{color:#c62828}.card.running b,.card.queued b{color:#1f5fbf}
.bar{height:.6rem;background:#eee;border-radius:3px;margin:.6rem 0}
.bar span{display:block;height:100%;background:#1a7f37;border-radius:3px}
.prov th{text-align:left;padding:.15rem 1rem .15rem 0;vertical-align:top;white-space:nowrap}
.prov td{overflow-wrap:anywhere}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(24rem,1fr));gap:1rem;margin:.8rem 0}
figure{margin:0;border:1px solid #e4e6ea;border-radius:6px;padding:.4rem;background:#fff}
figure img{width:100%;height:auto;display:block}
figcaption{font-size:.85em;color:#666;text-align:center}
.tbl{margin:1rem 0}
.tbar{display:flex;align-items:center;gap:.8rem;margin-bottom:.3rem}
.tbar h3{margin:0;font-size:1rem}
.tbar input{flex:0 1 22rem;padding:.2rem .4rem}
.tbar input.bad{outline:2px solid #c62828}
.count{color:#666;font-size:.9em}
.box{max-height:32rem;overflow:auto;border:1px solid #ddd;border-radius:4px}
.box table{border-collapse:collapse;font-size:.85em;font-variant-numeric:tabular-nums}
.box th,.box td{padding:.2rem .5rem;white-space:nowrap;border-bottom:1px solid #eee}
.box td{max-width:22rem;overflow:hidden;text-overflow:ellipsis}
.box th{position:sticky;top:0;background:#f0f2f5;cursor:pointer;user-select:none;text-align:left}
.box th.num,.box td.num{text-align:right}
.box th[aria-sort=ascending]::after{content:" ▲"}.box th[aria-sort=descending]::after{content:" ▼"}
.box tbody tr:nth-child(even){background:#fafbfc}
.box tbody tr:hover{background:#eef3fb}
"""
PAGE_SCRIPT = """
document.querySelectorAll('.tbl').forEach(tbl => {
  const table = tbl.querySelector('table'), body = table.tBodies[0], input = tbl.querySelector('input');
  const heads = [...table.tHead.rows[0].cells], names = heads.map(h => h.textContent.toLowerCase());
  const rows = [...body.rows], count = tbl.querySelector('.count');
  const value = (row, i) => { const c = row.cells[i]; return c.dataset.v !== undefined ? parseFloat(c.dataset.v) : c.textContent; };
  heads.forEach((th, i) => th.addEventListener('click', () => {
    const up = th.getAttribute('aria-sort') !== 'ascending', num = th.classList.contains('num');
    heads.forEach(h => h.removeAttribute('aria-sort'));
    th.setAttribute('aria-sort', up ? 'ascending' : 'descending');
    const key = r => value(r, i), blank = r => r.cells[i].textContent === '';
    rows.sort((a, b) => blank(a) - blank(b) || (up ? 1 : -1) *
      (num ? key(a) - key(b) : String(key(a)).localeCompare(String(key(b)), undefined, {numeric: true})));
    body.append(...rows);
  }));
  input.addEventListener('input', () => {
    let bad = '';
    const tests = input.value.trim().toLowerCase().split(/\\s+/).filter(Boolean).map(term => {
      const m = term.match(/^([^:<>=]+)([:<>=])(.*)$/);
      if (!m) return r => r.textContent.toLowerCase().includes(term);
      const i = names.indexOf(m[1]);
      if (i < 0) { bad = m[1]; return () => true; }
      const text = r => r.cells[i].textContent.toLowerCase(), want = parseFloat(m[3]);
      return {':': r => text(r).includes(m[3]), '=': r => text(r) === m[3],
              '>': r => value(r, i) > want, '<': r => value(r, i) < want}[m[2]];
    });
    input.classList.toggle('bad', !!bad);
    input.title = bad ? 'no column ' + bad + '; columns: ' + names.join(', ') : input.dataset.help;
    let shown = 0;
    rows.forEach(r => { const ok = tests.every(t => t(r)); r.hidden = !ok; shown += ok; });
    count.textContent = shown === rows.length ? rows.length + ' rows' : shown + ' of ' + rows.length + ' rows';
  });
  input.dataset.help = input.title;
});
const links = new Map([...document.querySelectorAll('nav a')].map(a => [a.hash.slice(1), a]));
const spy = new IntersectionObserver(entries => entries.forEach(e => {
  if (e.isIntersecting) { links.forEach(a => a.classList.remove('on')); links.get(e.target.id)?.classList.add('on'); }
}), {rootMargin: '0px 0px -80% 0px'});
document.querySelectorAll('main section').forEach(s => spy.observe(s));
"""


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
