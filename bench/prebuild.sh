#!/usr/bin/env bash
# Builds rnn_ext's CUDA extension on a CPU machine for another machine's Python and torch (the GPU
# machines: Python 3.12, torch 2.11.0+cu130, sm_90), into prebuilt/ (git-ignored), so that
# bench/gpu_check.sh can skip its build stage:
#
#   bash bench/prebuild.sh PYTHON            # PYTHON: an interpreter with that torch installed
#   bash bench/prebuild.sh --check PYTHON    # exit 0 iff prebuilt/ fits this source + PYTHON
#
# prebuilt/STAMP records what the .so was built from: a hash of csrc/ and setup.py, the Python
# ABI tag, the torch version and the architectures.  --check recomputes it with PYTHON (and the
# card's compute capability, when nvidia-smi sees one) and compares: a stale .so is never used.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=0
if [ "${1:-}" = "--check" ]; then CHECK=1; shift; fi
PY=${1:?usage: bash bench/prebuild.sh [--check] PYTHON}
ARCHS=${PREBUILD_ARCH_LIST:-9.0}

stamp() {  # the stamp of this source for PYTHON and ARCHS
  local src
  src=$(LC_ALL=C find csrc setup.py -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \
    -o -name '*.cuh' -o -name '*.py' \) | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)
  "$PY" -c "import sys, torch; print('source $src python', sys.implementation.cache_tag, \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'archs $1')"
}

if [ "$CHECK" = 1 ]; then
  [ -f prebuilt/STAMP ] && ls prebuilt/_C*.so >/dev/null 2>&1 || exit 1
  have=$(cat prebuilt/STAMP)
  archs=$(sed -n 's/.* archs //p' prebuilt/STAMP)
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ' || true)
  if [ -n "$cap" ]; then
    case ";$archs;" in *";$cap;"*) ;; *) echo "prebuilt/ is for $archs, the card is $cap"; exit 1 ;; esac
  fi
  want=$(stamp "$archs")
  if [ "$have" != "$want" ]; then
    echo "prebuilt/ does not fit: built from '$have', this is '$want'"
    exit 1
  fi
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/rnn_ext_prebuild.XXXXXX")
trap 'rm -rf "$work"' EXIT
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xf - -C "$work"
(cd "$work" && RNN_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py -q build_ext --inplace)
rm -rf prebuilt
mkdir -p prebuilt
cp "$work"/rnn_ext/_C*.so prebuilt/
strip --strip-debug prebuilt/_C*.so 2>/dev/null || true
stamp "$ARCHS" > prebuilt/STAMP
ls -la prebuilt
cat prebuilt/STAMP
