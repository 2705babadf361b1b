"""RFTBench: a benchmark harness for robust fine-tuning of pretrained image classifiers.

Data flows one way: config (conf/) -> study -> cells -> train -> evaluate -> rows -> tables ->
figures. Importing this package imports no torch: the analysis side must run on a laptop.
"""
