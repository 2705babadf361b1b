#!/usr/bin/env bash
# The test entry point behind `make test` (and so CI, which runs it with CI=true on a fresh
# clone after `make setup`). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k slurm`.
#
# The SLURM tests need the local cluster: start it when this machine can host one. When it
# cannot (not root, not Debian, or the start failed), go on: those tests skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly PYTEST=.venv/bin/pytest

start_cluster() {
  local rc=0
  bash scripts/slurm-local.sh start || rc=$?
  case $rc in
    0) ;;
    3) echo "test.sh: this machine cannot host the local SLURM cluster (reason above); the SLURM tests will skip" >&2 ;;
    *) echo "test.sh: the local SLURM cluster failed to start (exit $rc, logs above); the SLURM tests will skip" >&2 ;;
  esac
}

main() {
  [[ -x $PYTEST ]] || { echo "test.sh: $PYTEST is missing: run 'make setup' first" >&2; exit 1; }
  start_cluster
  local rc=0
  # No path given: pytest runs pyproject's testpaths (tests/).
  "$PYTEST" -q "$@" || rc=$?
  # pytest exits 5 when it collected nothing: a run that tests nothing must not pass.
  if [[ $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
  fi
  exit "$rc"
}

main "$@"
