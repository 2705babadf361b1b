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
# # Correlations: between conditions, and cheap protocols as proxies for the expensive one
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
# ## Spearman correlation between the conditions, over each protocol's cells

# %%
correlations = stats.spearman_by_protocol(cells)
protocol = next(iter(correlations))
correlations[protocol]

# %%
figures.heatmap(correlations[protocol], f"{protocol}: Spearman ρ over its cells")

# %% [markdown]
# ## Mean absolute off-diagonal correlation (MAC), overall and per group

# %%
mac = stats.mac(cells)
mac.pivot_table(index=["factor", "level"], columns="protocol", values="mac", sort=False)

# %% [markdown]
# ## Which cheap protocol predicts the expensive ranking?
# Spearman ρ between each cheap protocol's per-configuration `score_sum` and the reference's.

# %%
proxy = stats.proxy(tables)
proxy

# %%
figures.proxy_scatter({p: stats.proxy_pairs(tables, p) for p in proxy["protocol"].unique()}, proxy)
