"""Compact letter display of pairwise comparisons (Piepho 2004, insert-and-absorb).

Groups that share a letter are not significantly different; every significantly different pair
shares none. Letters run a, b, c, ... from the group listed first (the caller lists the groups
best first, so "a" marks the best).
"""
from __future__ import annotations

import string
from collections.abc import Iterable, Sequence


def compact_letters(groups: Sequence[str], different: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Letters per group, given the pairs of groups that differ significantly."""
    columns: list[set[str]] = [set(groups)]
    for a, b in different:
        split = []
        for column in columns:
            if a in column and b in column:
                split += [column - {a}, column - {b}]
            else:
                split.append(column)
        columns = _absorb(split)
    rank = {group: i for i, group in enumerate(groups)}
    columns.sort(key=lambda column: sorted(rank[g] for g in column))
    if len(columns) > len(string.ascii_lowercase):
        raise ValueError(f"{len(columns)} letter groups: more than the alphabet")
    return {
        group: "".join(letter for letter, column in zip(string.ascii_lowercase, columns) if group in column)
        for group in groups
    }


def _absorb(columns: list[set[str]]) -> list[set[str]]:
    """Drop every column contained in another (and duplicates): it adds no information."""
    kept: list[set[str]] = []
    for i, column in enumerate(columns):
        if any(column < other or (column == other and j < i) for j, other in enumerate(columns) if j != i):
            continue
        kept.append(column)
    return kept
