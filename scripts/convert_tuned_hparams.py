"""Convert the published study's tuned hyper-parameters (the authors' `tuned_hparams.csv`) into
the per-cell table format studies take (benchmark/hparams.py), once:

    .venv/bin/python scripts/convert_tuned_hparams.py PATH/TO/tuned_hparams.csv conf/study/paper_hparams.csv

Their names become our option names through each option's `study_name`; their values are copied
as written (no float round trip). lr1/weight_decay1 are the backbone's, lr2/weight_decay2 the
head's, `scheduler` is cosine annealing. Linear-probing rows carry a backbone learning rate and
weight decay that nothing used (the backbone is frozen): they are left empty here.
`nb_completed_trials` is kept as `n_trials` for information.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from benchmark.cell import AXES
from benchmark.reference import name_mapping
from benchmark.study import load_option, options

THEIR_AXES = {"dataset": "dataset", "model": "backbone", "loss": "loss_function", "protocol": "ft_strategy"}
COLUMNS = (*AXES, "lr_backbone", "lr_head", "weight_decay_backbone", "weight_decay_head", "cosine", "n_trials")


def convert(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Their rows in our format, in their order."""
    ours = {axis: name_mapping(axis, {o: load_option(axis, o).get("study_name") for o in options(axis)})
            for axis in AXES}
    converted = []
    for row in rows:
        names = {axis: ours[axis][row[column]] for axis, column in THEIR_AXES.items()}
        probe = not load_option("protocol", names["protocol"])["train_backbone"]
        converted.append({
            **names,
            "lr_backbone": "" if probe else row["lr1"], "lr_head": row["lr2"],
            "weight_decay_backbone": "" if probe else row["weight_decay1"], "weight_decay_head": row["weight_decay2"],
            "cosine": row["scheduler"].lower(), "n_trials": row["nb_completed_trials"],
        })
    return converted


def main(source: Path, target: Path) -> None:
    with open(source, newline="") as f:
        rows = convert(list(csv.DictReader(f)))
    with open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"{target}: {len(rows)} cells")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
