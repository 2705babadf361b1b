"""Errors a user can fix: the CLI prints them as one clear message, without a traceback."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class RFTBenchError(Exception):
    """Bad input or state, explained in words that name the bad value and what would be valid."""


def closest_first(value: str, choices: Iterable[str]) -> list[str]:
    """All `choices`, the ones closest to `value` first (so the likely typo fix leads)."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(value, choices, n=5, cutoff=0.4)
    return close + [c for c in choices if c not in close]


def unknown_choice(kind: str, value: str, choices: Iterable[str]) -> RFTBenchError:
    """An error for a name that is not one of `choices`, listing the closest matches first."""
    ordered = closest_first(value, choices)
    shown = ", ".join(ordered[:12]) + (f", ... ({len(ordered)} in all)" if len(ordered) > 12 else "")
    return RFTBenchError(f"unknown {kind} {value!r}; valid choices (closest first): {shown}")
