#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on the lent GPU machine, which has no network
# and whose Python 3.12 image has torch, transformers, tokenizers, safetensors, numpy, pyyaml
# and typing-extensions but not kdcache's store stack. Downloads cp312 manylinux wheels of
# each, at the version this checkout's .venv runs (the one its tests pass with), into
# .gpu-wheels/ (git-ignored), which a device call then carries:
#
#     bash benchmarks/gpu_wheels.sh            # -> .gpu-wheels/*.whl, ~2 MB
#     bash benchmarks/gpu_wheels.sh --list     # module:distribution, one a line
#
# --no-deps: each wheel's own requirements are either in this list or in the image.
set -euo pipefail

# import name:distribution, for what `import kdcache.storage` and kdcache.train need beyond the image.
NEEDS=(zarr:zarr numcodecs:numcodecs crc32c:crc32c google_crc32c:google-crc32c donfig:donfig)

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
