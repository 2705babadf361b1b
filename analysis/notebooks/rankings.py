# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Rankings: Borda scores, medals, clean vs robust, each dataset's winner
#
# The same functions as `rftbench figures`, one step per cell: edit a cell and re-run it.
# Open with `jupytext --to notebook analysis/notebooks/rankings.py` (or Jupyter's jupytext
# extension). Set `study` (and `results_root`, else `$RFTBENCH_RESULTS` / `results/`) below.

# %% tags=["parameters"]
study = "paper-published"
results_root = None

# %%
# %matplotlib inline
from pathlib import Path

from analysis import data, figures, rankings
from benchmark.paths import study_dir

cells = data.load(study, results_root)
flags = data.load_flags(study_dir(study, Path(results_root) if results_root else None))
tables = rankings.rankings(cells, data.flagged_cells(cells, flags))
{protocol: len(table) for protocol, table in tables.items()}

# %% [markdown]
# ## The ranking of each protocol (the study's appendix tables)
# Borda = the sum over datasets x conditions of a configuration's rank among the protocol's
# configurations (higher accuracy, higher rank). `degenerate`: clean accuracy below
# `rankings.DEGENERATE_FACTOR` x chance on `n_degenerate` datasets; `flagged`: a cell of the
# configuration is flagged in the study's `flags.csv` (e.g. published numbers known to be wrong).

# %%
protocol = next(iter(tables))
tables[protocol].head(15)

# %% [markdown]
# ## Medals: the best three configurations per size class and protocol

# %%
rankings.medals(tables)

# %% [markdown]
# ## Clean vs robust accuracy, one point per configuration

# %%
figures.scatter(tables[protocol])

# %% [markdown]
# ## Degenerate cells: clean accuracy near chance

# %%
bad = rankings.degenerate_cells(cells)
bad[["protocol", "dataset", "model", "loss", "accuracy", "chance"]].sort_values("accuracy").head(20)

# %% [markdown]
# ## Each dataset's winner over the conditions

# %%
winners = rankings.winners(cells, protocol)
winners

# %%
figures.radar(winners, f"{protocol}: each dataset's winner")
