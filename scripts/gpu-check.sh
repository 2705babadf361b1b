#!/usr/bin/env bash
# The GPU check: PYTHON=/path/to/python3 WHEELS=DIR scripts/gpu-check.sh [--install-only]
#
# Runs benchmark.gpu_check (name=value figures, see its docstring) with an existing interpreter
# that already has a CUDA build of torch, torchvision and timm (Python 3.11 or newer). The
# project and its other dependencies are installed from the wheel folder WHEELS, offline and
# without dependency resolution, into a private folder (GPU_CHECK_DIR, default
# ${TMPDIR:-/tmp}/rftbench-gpu-check); the interpreter's own packages are never touched, and no
# wheel of the torch family is installed over the interpreter's. Nothing is downloaded.
# Without a usable interpreter, a wheel folder or a CUDA GPU it stops before installing anything,
# with one line on stderr. --install-only: install and check the imports, no GPU needed.
set -uo pipefail

die() { echo "gpu-check: $2" >&2; exit "$1"; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
target="${GPU_CHECK_DIR:-${TMPDIR:-/tmp}/rftbench-gpu-check}"
install_only=false
[ "${1:-}" = "--install-only" ] && install_only=true

command -v "$PYTHON" >/dev/null 2>&1 || die 2 "no interpreter '$PYTHON': set PYTHON=/path/to/python3 (with a CUDA torch, torchvision and timm)"
probe="$("$PYTHON" - "$install_only" 2>&1 <<'PY'
import sys
if sys.version_info < (3, 11):
    print(f"Python {sys.version.split()[0]} is too old: 3.11 or newer"); sys.exit(2)
missing = []
for name in ("pip", "torch", "torchvision", "timm"):
    try:
        __import__(name)
    except Exception as err:
        missing.append(f"{name} ({type(err).__name__})")
if missing:
    print("the interpreter cannot import " + ", ".join(missing)); sys.exit(2)
import torch
if sys.argv[1] != "true" and not torch.cuda.is_available():
    print(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}): nothing to check")
    sys.exit(3)
PY
)"
status=$?
[ "$status" -eq 0 ] || die "$status" "$(printf '%s' "$probe" | tail -n 1)"

[ -n "${WHEELS:-}" ] || die 2 "set WHEELS=DIR, the wheel folder of the project and its dependencies (README: GPU check)"
[ -d "$WHEELS" ] || die 2 "WHEELS=$WHEELS is not a folder"
shopt -s nullglob
wheels=()
for wheel in "$WHEELS"/*.whl; do
    case "$(basename "$wheel")" in
        torch-*|torchvision-*|timm-*|triton-*|nvidia_*) ;;  # the interpreter's own
        *) wheels+=("$wheel") ;;
    esac
done
project=("$WHEELS"/rftbench-*.whl)
[ "${#project[@]}" -gt 0 ] || die 2 "no rftbench-*.whl in $WHEELS (pip wheel --no-deps -w $WHEELS $here)"

"$PYTHON" -m pip install --quiet --no-index --no-deps --upgrade --target "$target" "${wheels[@]}" >/dev/null 2>&1 \
    || die 2 "could not install the wheels of $WHEELS into $target (pip install --no-index --no-deps --target)"
# The project installed from a wheel has no config tree: its options are read from this checkout's.
export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" RFTBENCH_CONF_PATH="$here/conf"
if $install_only; then
    "$PYTHON" -c "import benchmark.gpu_check" 2>/dev/null || die 2 "installed into $target, but benchmark.gpu_check does not import"
    echo "installed=$target"
    exit 0
fi
exec "$PYTHON" -m benchmark.gpu_check
