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

# The report page test drives Debian's headless Chromium (with selenium, a dev dependency):
# install it when this machine can (root on Debian); elsewhere that test skips with the reason.
install_browser() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return 0
  if [[ $(id -u) -ne 0 || ! -f /etc/debian_version ]]; then
    echo "test.sh: chromium is missing and this is not root on Debian; the report page test will skip" >&2
    return 0
  fi
  local log=/tmp/rftbench-browser-apt.log
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
  } >"$log" 2>&1 || echo "test.sh: installing chromium failed (log: $log); the report page test will skip" >&2
}

main() {
  [[ -x $PYTEST ]] || { echo "test.sh: $PYTEST is missing: run 'make setup' first" >&2; exit 1; }
  start_cluster
  install_browser
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
