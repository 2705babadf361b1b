"""`rftbench export` and `rftbench import-study`: one study's results as a single archive, merged
into another results root cell by cell, so that a study run across several clusters becomes one.

The archive is a gzip'd tar. Its first member, `manifest.json`, names the format and its version,
the study, the rftbench version that wrote it, the cell ids and the sha256 of every other member;
the members are files of the study directory under their relative paths:
  cells/<cell_id>/...  each done cell's result files: the `*.parquet` and `*.yaml` of its
                       directory (config, rows, per-example results, histories, ...), never
                       ckpt/ or aa_state/, nor its log, state or heartbeat
  flags.csv            the study's flagged cells, when it has them
A cell without rows (pending, failed) has no results and is not exported; an imported study
(`import-reference`) exports what it has.

Importing merges cell by cell: a cell the study lacks is added; a cell it has with equal rows
(compared without `study` and `source_file`, which name where the rows were written) is left as
it is, so importing an archive twice changes nothing; so is a cell whose rows differ only in
provenance (the same measurements, MEASURED_COLUMNS, from another run: other times, host or
versions), the study's rows being kept; a cell with other measurements is a conflict, and the
import is refused, listing every conflict, before anything is written. Imported rows, configs
and Parquet files name the target study (`study=NAME` renames the archive's). A cell directory of
the study that has no rows yet is completed by the imported files.

Protocol, under the study's collect lock (collects wait for an import; imports take turns):
  1. recover  `<study>/.import/` left by an earlier import is finished when it holds its
              journal (step 4 was reached), else removed
  2. stage    every member is written into `.import/`, its sha256 checked against the manifest,
              then renamed to the target study; the study itself is not touched
  3. compare  staged cells equal to the study's are dropped; conflicts stop the import here
  4. commit   `.import/journal.json` (written atomically) names the cells to place
  5. place    each staged cell directory is renamed into `cells/` (one atomic rename; into a
              cell directory without rows, file by file with rows.parquet last), then flags.csv
  6. clean    the journal, then `.import/`, are removed, and the study is collected
A kill -9 before step 4 leaves the study as it was; after it, every cell is as it was or whole,
and the next import or export of the study finishes the placing first.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmark.arguments import parse, study_and_root
from benchmark.atomic import write_atomic, write_json_atomic, write_text_atomic
from benchmark.cell import AXES, CELLS_DIR, CONFIG_FILE, ROWS_FILE, cell_id, cells_with_directory, read_config
from benchmark.collect import Collected, collect, print_warnings, study_lock
from benchmark.errors import RFTBenchError
from benchmark.paths import study_dir
from benchmark.results import CorruptResultError, read_rows, write_table
from benchmark.tables import existing_study_dir

FORMAT = "rftbench-study-archive"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"        # the archive's first member
FLAGS_FILE = "flags.csv"          # the study's flagged cells (benchmark.reference)
RESULT_SUFFIXES = (".parquet", ".yaml")
LEFT_BEHIND = ("ckpt", "aa_state")  # a cell's subdirectories that are never exported
STAGING_DIR = ".import"           # <study>/.import/: an import in progress
JOURNAL = "journal.json"          # <study>/.import/journal.json: the import's commit point
# Columns that say where a row was written, not what was measured: compared without them.
PLACE_COLUMNS = ("study", "source_file")
# The columns that say what was measured and its value: two rows of a cell that agree on these
# are the same measurement, even when run twice (other times, hosts or versions).
MEASURED_COLUMNS = ("cell_id", *AXES, "seed", "condition", "norm", "epsilon", "eps_grid", "attack",
                    "n_examples", "n_correct", "accuracy")
_CELL_ID = re.compile(r"[0-9a-f]{16}")
_STUDY_NAME = re.compile(r"[\w+-][\w.+-]*")
_SHOWN = 10  # conflicts named in the error before "..."


@dataclass(frozen=True)
class Exported:
    """What `export_study` wrote, and the cells it left out with the reason."""

    path: Path
    study: str
    cells: int
    files: int
    skipped: list[str]  # "<cell_id>: <reason>"


@dataclass(frozen=True)
class Imported:
    """What `import_study` did with each cell of the archive, and the collect after it."""

    study_dir: Path
    added: list[str]
    unchanged: list[str]  # the study had the cell with equal rows
    rerun: list[str]      # the study had the same measurements from another run: its rows kept
    collected: Collected


# --- export ------------------------------------------------------------------------------------

def export_study(study: str, out: Path, results_root: Path | None = None) -> Exported:
    """Write `study`'s done cells and flags.csv to the archive `out` (whole or not at all)."""
    directory = existing_study_dir(study, results_root)
    with study_lock(directory):
        finish_interrupted_import(directory)
    files: dict[str, Path] = {}
    cells, skipped = [], []
    for cell in sorted(cells_with_directory(directory)):
        cell_dir = directory / CELLS_DIR / cell
        if not (cell_dir / ROWS_FILE).exists():
            continue  # pending or failed: no results to move
        reason = _unexportable(cell_dir)
        if reason:
            skipped.append(f"{cell}: {reason}")
            continue
        cells.append(cell)
        files |= {path.relative_to(directory).as_posix(): path for path in _result_files(cell_dir)}
    if (directory / FLAGS_FILE).is_file():
        files[FLAGS_FILE] = directory / FLAGS_FILE
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "study": study, "rftbench_version": _version(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "cells": cells,
        "files": {name: _sha256(path.read_bytes()) for name, path in files.items()},
    }
    write_atomic(out, lambda tmp: _write_archive(tmp, manifest, files))
    return Exported(out, study, len(cells), len(files), skipped)


def _unexportable(cell_dir: Path) -> str | None:
    """Why a done cell cannot be exported (its rows or config cannot be trusted), else None."""
    try:
        rows = read_rows(cell_dir / ROWS_FILE)
        document = read_config(cell_dir)
    except CorruptResultError as err:
        return f"{ROWS_FILE}: {err.reason}"
    except (OSError, yaml.YAMLError) as err:
        return f"{CONFIG_FILE}: unreadable ({err})"
    if not isinstance(document, dict) or document.get("cell_id") != cell_dir.name:
        return f"{CONFIG_FILE}: not this cell's config"
    if set(rows["cell_id"].to_pylist()) != {cell_dir.name}:
        return f"{ROWS_FILE}: rows of another cell"
    return None


def _result_files(cell_dir: Path) -> Iterator[Path]:
    """The cell's result files (RESULT_SUFFIXES), outside LEFT_BEHIND and hidden (temporary) names."""
    for root, dirs, names in os.walk(cell_dir):
        if Path(root) == cell_dir:
            dirs[:] = [d for d in dirs if d not in LEFT_BEHIND]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.endswith(RESULT_SUFFIXES):
                yield Path(root) / name


def _write_archive(path: Path, manifest: dict[str, Any], files: dict[str, Path]) -> None:
    """The manifest first, then each file, checked to be the bytes the manifest hashed."""
    with tarfile.open(path, "w:gz") as tar:
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        _add(tar, MANIFEST, text.encode(), datetime.now(UTC).timestamp())
        for name, file in files.items():
            data = file.read_bytes()
            if _sha256(data) != manifest["files"][name]:
                raise RFTBenchError(f"{file} changed while the study was exported: export it again")
            _add(tar, name, data, file.stat().st_mtime)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


# --- import ------------------------------------------------------------------------------------

def import_study(archive: Path, study: str | None = None, results_root: Path | None = None) -> Imported:
    """Merge the archive into `study` (default: the archive's own) under the results root; see
    the module docstring. A foreign or corrupted archive, or a conflicting cell, is an
    RFTBenchError and leaves the study as it was."""
    with _open_archive(archive) as (tar, manifest):
        target = _study_name(study or manifest["study"])
        directory = study_dir(target, results_root)
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with study_lock(directory):
                finish_interrupted_import(directory)
                outcome = _import_locked(tar, manifest, directory, archive.name)
        except BaseException:
            if created:  # a refused import into a new study leaves no trace of it
                shutil.rmtree(directory, ignore_errors=True)
            raise
    return Imported(directory, outcome.added, outcome.unchanged, outcome.rerun, collect(directory))


def finish_interrupted_import(directory: Path) -> bool:
    """Finish (journal present) or remove (no journal) an import a kill left in `directory`;
    True when there was one. Call with the study's collect lock held."""
    staging = directory / STAGING_DIR
    if not staging.exists():
        return False
    if (staging / JOURNAL).is_file():
        _place(directory, json.loads((staging / JOURNAL).read_text()))
    shutil.rmtree(staging)
    return True


def _study_name(name: str) -> str:
    """`name`, refused if it is not a plain directory name."""
    if not _STUDY_NAME.fullmatch(name):
        raise RFTBenchError(f"study name {name!r}: expected letters, digits and . _ - + (not starting with .)")
    return name


@contextmanager
def _open_archive(path: Path) -> Iterator[tuple[tarfile.TarFile, dict[str, Any]]]:
    """The tar and its checked manifest; a foreign or unreadable file is an RFTBenchError."""
    try:
        tar = tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise RFTBenchError(f"no archive {path}") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise RFTBenchError(f"{path} is not an rftbench study archive (not a tar file: {err})") from None
    with tar:
        yield tar, _manifest(tar, path)


def _manifest(tar: tarfile.TarFile, path: Path) -> dict[str, Any]:
    try:
        first = tar.next()
        is_manifest = first is not None and first.name == MANIFEST and first.isfile()
        manifest = json.loads(tar.extractfile(first).read()) if is_manifest else None
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as err:
        raise RFTBenchError(f"{path}: corrupted archive ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RFTBenchError(f"{path} is not an rftbench study archive (its first member is not a {MANIFEST} of {FORMAT})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RFTBenchError(
            f"{path}: archive format version {manifest.get('format_version')!r}; this rftbench reads version "
            f"{FORMAT_VERSION} (written by rftbench {manifest.get('rftbench_version')})"
        )
    cells, files = manifest.get("cells"), manifest.get("files")
    if not isinstance(manifest.get("study"), str) or not isinstance(cells, list) or not isinstance(files, dict):
        raise RFTBenchError(f"{path}: {MANIFEST} lacks its study, cells or files")
    ids = [c for c in cells if not isinstance(c, str) or not _CELL_ID.fullmatch(c)]
    known = {c for c in cells if isinstance(c, str)}
    bad = [name for name, sha in files.items() if not isinstance(sha, str) or not _member_path_ok(name, known)]
    if ids or bad:
        raise RFTBenchError(f"{path}: {MANIFEST} names cells or files outside the study layout: {(ids + bad)[:5]}")
    return manifest


def _member_path_ok(name: str, cells: set[str]) -> bool:
    parts = PurePosixPath(name).parts
    if name == FLAGS_FILE:
        return True
    return (len(parts) >= 3 and parts[0] == CELLS_DIR and parts[1] in cells and name.endswith(RESULT_SUFFIXES)
            and not any(part in ("", ".", "..") or part.startswith(".") for part in parts)
            and parts[2] not in LEFT_BEHIND)


@dataclass
class _Outcome:
    """Each archive cell by what the import does with it."""

    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    rerun: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # "<id> (<slug>): <how the rows differ>"


def _import_locked(tar: tarfile.TarFile, manifest: dict[str, Any], directory: Path, name: str) -> _Outcome:
    """Steps 2 to 6 of the protocol."""
    staging = directory / STAGING_DIR
    staging.mkdir()
    try:
        _stage(tar, manifest, staging, name)
        _retarget(staging, manifest, directory.name)
        outcome = _compare(staging, manifest["cells"], directory)
        if outcome.conflicts:
            raise _conflict_error(outcome.conflicts, directory.name, name)
        flags = _merged_flags(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    journal = {"cells": outcome.added, "flags": flags}
    write_json_atomic(staging / JOURNAL, journal)  # the commit point
    _place(directory, journal)
    shutil.rmtree(staging)
    return outcome


def _stage(tar: tarfile.TarFile, manifest: dict[str, Any], staging: Path, name: str) -> None:
    """Write every member into `staging`, each checked against the manifest's sha256."""
    expected: dict[str, str] = manifest["files"]
    seen = set()
    try:
        for member in tar:
            if member.offset == 0:  # the manifest, read already
                continue
            if member.name not in expected or member.name in seen or not member.isfile():
                raise RFTBenchError(f"{name}: corrupted archive: unexpected member {member.name!r}")
            _stage_member(tar, member, staging, expected[member.name], name)
            seen.add(member.name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise RFTBenchError(f"{name}: corrupted archive ({err})") from None
    missing = sorted(expected.keys() - seen)
    if missing:
        raise RFTBenchError(f"{name}: corrupted archive: {len(missing)} files of its manifest are missing, e.g. {missing[:3]}")
    without_rows = [c for c in manifest["cells"] if f"{CELLS_DIR}/{c}/{ROWS_FILE}" not in seen
                    or f"{CELLS_DIR}/{c}/{CONFIG_FILE}" not in seen]
    if without_rows:
        raise RFTBenchError(f"{name}: cells without {ROWS_FILE} or {CONFIG_FILE}: {without_rows[:5]}")


def _stage_member(tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path, sha256: str, name: str) -> None:
    data = tar.extractfile(member).read()
    if _sha256(data) != sha256:
        raise RFTBenchError(f"{name}: corrupted archive: {member.name} does not match its sha256 in {MANIFEST}")
    path = staging / member.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _retarget(staging: Path, manifest: dict[str, Any], study: str) -> None:
    """Check each staged cell's config and rows are its own, and make its files name `study`
    (config.yaml's `study`, the `study` column of its Parquet files)."""
    for cell in manifest["cells"]:
        cell_dir = staging / CELLS_DIR / cell
        document = _staged_config(cell_dir)
        rows = _staged_rows(cell_dir)
        if document.get("study") != study:
            write_text_atomic(cell_dir / CONFIG_FILE, yaml.safe_dump({**document, "study": study}, sort_keys=False))
        for path in cell_dir.rglob("*.parquet"):
            table = rows if path.name == ROWS_FILE and path.parent == cell_dir else _parquet(path)
            if "study" in table.column_names and set(table["study"].to_pylist()) != {study}:
                index = table.column_names.index("study")
                column = pa.array([study] * table.num_rows, table.field(index).type)
                write_table(path, table.set_column(index, table.field(index), column))


def _parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise RFTBenchError(f"archive file {path.name} of cell {path.parent.name}: unreadable Parquet ({err})") from None


def _staged_config(cell_dir: Path) -> dict[str, Any]:
    """The staged cell's config document, checked to be the config of that id."""
    try:
        document = read_config(cell_dir)
        own = isinstance(document, dict) and document.get("cell_id") == cell_dir.name
        if own and cell_id(document["config"]) == cell_dir.name:
            return document
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        pass
    raise RFTBenchError(f"archive cell {cell_dir.name}: its {CONFIG_FILE} is not the config of this cell id")


def _staged_rows(cell_dir: Path) -> pa.Table:
    try:
        rows = read_rows(cell_dir / ROWS_FILE)
    except CorruptResultError as err:
        raise RFTBenchError(f"archive cell {cell_dir.name}: {ROWS_FILE}: {err.reason}") from None
    if set(rows["cell_id"].to_pylist()) != {cell_dir.name}:
        raise RFTBenchError(f"archive cell {cell_dir.name}: {ROWS_FILE} holds rows of another cell")
    return rows


def _compare(staging: Path, cells: list[str], directory: Path) -> _Outcome:
    outcome = _Outcome()
    for cell in cells:
        live_path = directory / CELLS_DIR / cell / ROWS_FILE
        if not live_path.exists():
            outcome.added.append(cell)
            continue
        staged = read_rows(staging / CELLS_DIR / cell / ROWS_FILE)
        try:
            live = read_rows(live_path)
        except CorruptResultError as err:
            live, conflict = None, f"the study's {ROWS_FILE} is unreadable ({err.reason})"
        if live is not None and _difference(staged, live, PLACE_COLUMNS) is None:
            outcome.unchanged.append(cell)
            continue
        if live is not None:
            conflict = _difference(staged, live, tuple(set(staged.column_names) - set(MEASURED_COLUMNS)))
        if conflict is None:
            outcome.rerun.append(cell)
        else:
            outcome.conflicts.append(f"{cell} ({read_config(staging / CELLS_DIR / cell).get('slug')}): {conflict}")
    return outcome


def _difference(staged: pa.Table, live: pa.Table, ignored: tuple[str, ...]) -> str | None:
    """None when the rows are equal but for the `ignored` columns, else what differs."""
    staged, live = staged.drop_columns(list(ignored)), live.drop_columns(list(ignored))
    if staged.equals(live):
        return None
    if staged.num_rows != live.num_rows:
        return f"{staged.num_rows} rows in the archive, {live.num_rows} in the study"
    columns = [name for name in staged.column_names if not staged[name].equals(live[name])]
    return f"rows differ in {', '.join(columns)}"


def _conflict_error(conflicts: list[str], study: str, name: str) -> RFTBenchError:
    shown = "\n  ".join(conflicts[:_SHOWN]) + (f"\n  ... ({len(conflicts)} in all)" if len(conflicts) > _SHOWN else "")
    return RFTBenchError(
        f"{len(conflicts)} cells of {name} are in study {study!r} with other rows (same cell id, different "
        f"measurements); nothing was imported. Conflicting cells:\n  {shown}"
    )


def _merged_flags(staging: Path, directory: Path) -> bool:
    """Stage the study's flags.csv merged with the archive's (the study's lines, then the
    archive's new ones); True when the study's file changes."""
    theirs, ours = staging / FLAGS_FILE, directory / FLAGS_FILE
    if not theirs.is_file():
        return False
    if not ours.is_file():
        return True
    their_lines, our_lines = theirs.read_text().splitlines(), ours.read_text().splitlines()
    if their_lines[:1] != our_lines[:1]:
        raise RFTBenchError(f"the archive's {FLAGS_FILE} has other columns than study {directory.name!r}'s: "
                            f"{their_lines[:1]} and {our_lines[:1]}")
    new = [line for line in their_lines[1:] if line not in set(our_lines)]
    if not new:
        theirs.unlink()
        return False
    write_text_atomic(theirs, "\n".join([*our_lines, *new]) + "\n")
    return True


def _place(directory: Path, journal: dict[str, Any]) -> None:
    """Step 5: move the journal's staged cells and flags into the study; safe to repeat."""
    staging = directory / STAGING_DIR
    (directory / CELLS_DIR).mkdir(exist_ok=True)
    for cell in journal["cells"]:
        _place_cell(staging / CELLS_DIR / cell, directory / CELLS_DIR / cell)
    if journal["flags"] and (staging / FLAGS_FILE).exists():
        os.replace(staging / FLAGS_FILE, directory / FLAGS_FILE)
    (staging / JOURNAL).unlink()


def _place_cell(staged: Path, target: Path) -> None:
    """Move a staged cell into the study: one rename, or file by file (rows last) into a cell
    directory that exists without rows. Nothing left to move: placed before a kill."""
    if not staged.exists():
        return
    if not target.exists():
        os.rename(staged, target)
        return
    files = sorted((p for p in staged.rglob("*") if p.is_file()), key=lambda p: p == staged / ROWS_FILE)
    for path in files:
        destination = target / path.relative_to(staged)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    shutil.rmtree(staged)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _version() -> str | None:
    try:
        return metadata.version("rftbench")
    except metadata.PackageNotFoundError:
        return None


# --- commands ----------------------------------------------------------------------------------

def export_command(args: argparse.Namespace) -> int:
    """`rftbench export study=NAME [paths.results=DIR] --out FILE`: 1 when a cell was left out."""
    study, results_root = study_and_root(args.overrides)
    report = export_study(study, Path(args.out), results_root)
    print(f"exported study {study}: {report.cells} cells, {report.files} files in {report.path}")
    for skipped in report.skipped:
        print(f"skipped cell {skipped}", file=sys.stderr)
    return 1 if report.skipped else 0


def import_command(args: argparse.Namespace) -> int:
    """`rftbench import-study FILE [study=NAME] [paths.results=DIR]`: 1 when collect skipped a cell."""
    words = parse(args.overrides, ("study", "paths.results"))
    report = import_study(Path(args.path), words.get("study"), words.path("paths.results"))
    print(f"imported {Path(args.path).name} into study {report.study_dir.name}: {len(report.added)} cells added, "
          f"{len(report.unchanged)} already there with equal rows, {len(report.rerun)} already there with the same "
          f"measurements from another run (the study's rows kept); {report.collected.cells} cells, "
          f"{report.collected.measurements} measurements in {report.study_dir}")
    print_warnings(report.collected)
    return 1 if report.collected.problems else 0
