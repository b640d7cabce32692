#!/usr/bin/env bash
# The GPU check of issue 23 in one command (docs/benchmarks.md, "GPU (to run)").
#
#   bash experiments/gpu/run.sh [OUT] [--tiny] [--budget SECONDS] [--parts a,b,…]
#
# OUT: where the results go (default: $OUT, the device tool's output folder, else runs/gpu-check).
# It makes the checked-out source importable (PYTHONPATH=src; nothing is built or installed
# into the interpreter), installs what the interpreter lacks from the carried wheels/ folder
# (offline, into the work folder), then runs experiments/gpu/gpucheck.py: `tmerge bench` for the
# default network and MONAI's DynUNet and SegResNet, and task1, task2 (a noise copy) and timm at
# the paper's sizes on synthetic 1 mm data of BraTS geometry, each part under a time limit and
# the whole under --budget seconds (default 540, counted from here), with the results rewritten
# into OUT after every part. --tiny shrinks every size: the CPU dry run.
#
# Environment: PYTHON (default python3), GPU_CHECK_WORK (data, runs, caches; default
# /tmp/tmerge-gpu-check; a second call on the same machine reuses its data and finished runs).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export GPU_CHECK_COMMAND="bash experiments/gpu/run.sh $*"
out=${OUT:-$repo/runs/gpu-check}
if [[ $# -gt 0 && $1 != --* ]]; then out=$1; shift; fi
work=${GPU_CHECK_WORK:-/tmp/tmerge-gpu-check}
python=${PYTHON:-python3}
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
export GPU_CHECK_START=${GPU_CHECK_START:-$(date +%s)}

# Everything printed from here on is also in OUT/log.txt.
exec > >(tee -a "$out/log.txt") 2>&1
echo "[gpucheck] $(date '+%F %T') on $(hostname): out=$out work=$work python=$python args=$*"

export PYTHONPATH="$work/site:$repo/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled GPU_CHECK_WORK="$work"
export TMERGE_RUNS="$work/runs" TMERGE_DATA="$work/data"

# What the check imports beyond the lent GPU image (Python 3.12, torch, lightning, torchmetrics,
# scipy, numpy, PyYAML, safetensors, filelock): MONAI, nibabel, OmegaConf, and deepmriprep for
# the brain templates the synthetic data are made from (its data files only, not imported).
missing() {
    "$python" - <<'EOF'
import importlib.util
need = ("torch", "lightning", "torchmetrics", "scipy", "monai", "nibabel", "omegaconf", "deepmriprep")
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
}
lacking=$(missing)
if [[ -n $lacking ]]; then
    shopt -s nullglob
    wheels=("$repo"/wheels/*.whl)
    if [[ ${#wheels[@]} -eq 0 ]]; then
        echo "[gpucheck] missing: $lacking, and no wheels/ to install them from (docs/benchmarks.md)" >&2
        exit 2
    fi
    echo "[gpucheck] installing ${#wheels[@]} wheel(s) into $work/site for: $lacking"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --root-user-action=ignore --target "$work/site" "${wheels[@]}"
    lacking=$(missing)
    if [[ -n $lacking ]]; then
        echo "[gpucheck] still missing after installing wheels/: $lacking" >&2
        exit 2
    fi
fi
"$python" -c "import tmerge.cli" # the checkout imports with what is there

exec "$python" "$repo/experiments/gpu/gpucheck.py" run "$out" --work "$work" "$@"
