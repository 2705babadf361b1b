"""Analysis of a study's result table: rankings, statistics, figures and the report.

Pure pandas / scipy / statsmodels / matplotlib over the long table of `benchmark.results`, so it
runs the same on imported published results and on our own runs, on a laptop, without torch.
`rftbench figures` (analysis.report) and the notebooks in analysis/notebooks call the same
functions.
"""
