#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on the lent GPU machine, which has no network
# and whose Python 3.12 image has torch, transformers, tokenizers, safetensors, numpy, pyyaml
# and typing-extensions but not kdcache's store stack. Downloads cp312 manylinux wheels of
# each, at the version this checkout's .venv runs (the one its tests pass with), into
# .gpu-wheels/ (git-ignored), which a device call then carries:
#
#     bash benchmarks/gpu_wheels.sh            # -> .gpu-wheels/*.whl, ~50 MB (llvmlite: ~42)
#     bash benchmarks/gpu_wheels.sh --list     # module:distribution, one a line
#
# --no-deps: each wheel's own requirements are either in this list or in the image.
set -euo pipefail

# import name:distribution, for what `import kdcache.storage` and kdcache.train need beyond the image;
# numba and llvmlite code top-k ids and log-probs (storage/rans.py, loaded on first use).
NEEDS=(zarr:zarr numcodecs:numcodecs crc32c:crc32c google_crc32c:google-crc32c donfig:donfig
       numba:numba llvmlite:llvmlite)

if [[ ${1:-} == --list ]]; then
    printf '%s\n' "${NEEDS[@]}"
    exit 0
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
dest=${1:-$repo/.gpu-wheels}
pins=()
for need in "${NEEDS[@]}"; do
    dist=${need#*:}
    version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist") ||
        { echo "gpu_wheels.sh: $dist is not installed in $python (run make first)" >&2; exit 1; }
    pins+=("$dist==$version")
done
mkdir -p "$dest"
"$python" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${pins[@]}"
ls -l "$dest"
