#!/usr/bin/env bash
# The GPU checks in one call, for a lent machine without network, Ray or vLLM:
#
#     bash benchmarks/gpu_check.sh OUT_DIR [--cpu]
#
# writes OUT_DIR/gpu_check.json (after every part, so a failure or a timeout keeps what was
# measured) and OUT_DIR/gpu_check.log, prints a summary, and exits non-zero if any part failed.
# What it measures: benchmarks/gpu_check.py. --cpu runs tiny sizes on the CPU (no GPU looked
# at), every code path in well under two minutes: tests/test_gpu_check.py runs it.
#
# Set-up, each step only where needed, nothing installed into the image's environment:
# - a module of benchmarks/gpu_wheels.sh --list that does not import is installed from the
#   carried wheels (GPU_WHEELS, default .gpu-wheels/; `bash benchmarks/gpu_wheels.sh` fetches
#   them here) into a temporary folder put on PYTHONPATH, with --no-deps: torch is never touched;
# - where kdcache is not installed, its packages (pyproject's [tool.setuptools.package-dir])
#   are linked into a temporary folder on PYTHONPATH.
#
# On the lent machine, after `bash benchmarks/gpu_wheels.sh` here (sized for a few minutes on
# an H100, well inside 8; not yet timed there):
#     run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".gpu-wheels"], timeout_s=480)
set -euo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--cpu]" >&2; exit 2; }
fail() { echo "gpu_check.sh: error: $*" >&2; exit 1; }

[[ $# -ge 1 && $1 != -* ]] || usage
out=$1
device=cuda
case ${2:-} in
    --cpu) device=cpu; export CUDA_VISIBLE_DEVICES="" ;;
    "") ;;
    *) usage ;;
esac
[[ $# -le 2 ]] || usage

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
wheels=${GPU_WHEELS:-$repo/.gpu-wheels}
mkdir -p "$out"
out=$(cd "$out" && pwd)
setup=$(mktemp -d "${TMPDIR:-/tmp}/kdcache-gpu-setup-XXXXXX")
trap 'rm -rf "$setup"' EXIT
export PYTHONUNBUFFERED=1

# -P: nothing from the working directory shadows what is (not) installed.
imports() { "$python" -P -c "import $1" 2>/dev/null; }

missing=()
for need in $(bash "$repo/benchmarks/gpu_wheels.sh" --list); do
    imports "${need%%:*}" || missing+=("${need#*:}")
done
if ((${#missing[@]})); then
    [[ -d $wheels ]] || fail "${missing[*]} missing and no wheels at $wheels (bash benchmarks/gpu_wheels.sh, then carry it)"
    echo "gpu_check.sh: installing ${missing[*]} from $wheels" >&2
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --find-links "$wheels" --target "$setup/site" "${missing[@]}" || fail "installing ${missing[*]} failed"
    export PYTHONPATH="$setup/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$python" -P -c "import importlib.util as u; assert u.find_spec('kdcache.storage')" 2>/dev/null; then
    echo "gpu_check.sh: kdcache is not installed; importing it from $repo" >&2
    "$python" - "$repo" "$setup/src" <<'EOF' || fail "could not lay out kdcache's packages"
import sys
import tomllib
from pathlib import Path

repo, src = Path(sys.argv[1]), Path(sys.argv[2])
dirs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
for name, folder in sorted(dirs.items()):
    target = src.joinpath(*name.split("."))
    if "." in name:
        target.symlink_to(repo / folder, target_is_directory=True)
        continue
    target.mkdir(parents=True)
    for entry in (repo / folder).iterdir():
        (target / entry.name).symlink_to(entry)
EOF
    export PYTHONPATH="$setup/src${PYTHONPATH:+:$PYTHONPATH}"
fi

set +e
"$python" "$repo/benchmarks/gpu_check.py" --device "$device" --out "$out" 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
set -e
[[ -s $out/gpu_check.json ]] || fail "no $out/gpu_check.json written"
exit "$status"
