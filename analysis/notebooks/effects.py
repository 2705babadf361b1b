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
# # Effects: what drives the Borda score, and which loss beats which
#
# The same functions as `rftbench figures`. Set `study` (and `results_root`) below.

# %% tags=["parameters"]
study = "paper-published"
results_root = None

# %%
# %matplotlib inline
from analysis import data, figures, rankings, stats

cells = data.load(study, results_root)
tables = rankings.rankings(cells)

# %% [markdown]
# ## Main effects: mean Borda per level of size, type, loss and pretraining
# One-way ANOVA p-value per factor; levels sharing a Tukey HSD letter do not differ
# significantly (α = 0.05).

# %%
main = stats.main_effects(tables)
main

# %%
protocol = next(iter(tables))
figures.effect_bars(main[main["protocol"] == protocol], f"{protocol}: main effects (Tukey HSD letters)")

# %% [markdown]
# ## Interactions: mean Borda per pair of levels of each pair of factors

# %%
crossed = stats.interactions({protocol: tables[protocol]})
figures.effect_bars(crossed, f"{protocol}: interactions (Tukey HSD letters)")

# %% [markdown]
# ## The study's losses compared, pair by pair, per size class and protocol
# For each pair of losses (A, B): backbones where A has the higher `score_sum`; Fisher's exact
# test on the 2x2 table (this size class vs the protocol's other classes) x (A wins, B wins).

# %%
odds = stats.odds(tables)
odds

# %%
figures.odds_plot(odds)
