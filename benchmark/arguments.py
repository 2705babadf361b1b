"""The `key=value` words of the commands that take no Hydra overrides (collect, query, figures,
compare, import-reference, prepare-data): one parser and one vocabulary for all of them, the
same key names as the config's (`study`, `paths.results`, `paths.data`, ...).

Commands that plan a study (plan, launch, show, tune, ...) hand their words to Hydra's override
grammar instead (benchmark.study), which adds sweeps and globs; this one imports neither Hydra
nor torch, so the commands over results start fast and run on a laptop.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmark.errors import RFTBenchError, unknown_choice


@dataclass(frozen=True)
class Words:
    """Parsed words: every value given for each key, in order."""

    values: dict[str, list[str]]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values[key][-1] if self.values.get(key) else default

    def all(self, key: str) -> list[str]:
        return list(self.values.get(key, []))

    def path(self, key: str) -> Path | None:
        value = self.get(key)
        return Path(value) if value else None


def parse(words: Sequence[str], keys: Sequence[str], repeatable: Sequence[str] = ()) -> Words:
    """`key=value` words, each key one of `keys` (given once, unless `repeatable`); a value may be
    quoted. An RFTBenchError names a malformed word or an unknown key with the closest choices."""
    values: dict[str, list[str]] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key or not value:
            raise RFTBenchError(f"malformed argument {word!r}: expected key=value with key one of {', '.join(keys)}")
        if key not in keys:
            raise unknown_choice("argument", key, keys)
        if key in values and key not in repeatable:
            raise RFTBenchError(f"argument {key} is given twice ({values[key][0]!r} and {_unquoted(value)!r})")
        values.setdefault(key, []).append(_unquoted(value))
    return Words(values)


def study_and_root(words: Sequence[str], default: str = "demo") -> tuple[str, Path | None]:
    """The study named by `study=NAME` (else `default`) and the results root `paths.results=DIR`
    (None: the default root): all that commands over one study's existing results take."""
    parsed = parse(words, ("study", "paths.results"))
    return str(parsed.get("study", default)), parsed.path("paths.results")


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value
