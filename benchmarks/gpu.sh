#!/usr/bin/env bash
# benchmarks/gpu.sh -- every GPU check of the project in one run of at most about 9 minutes (the sum of the steps'
# limits), for a GPU machine held for a few minutes. Each step runs under its own time limit, and a failed or
# timed-out step does not stop the others:
#   env                    the card, torch and triton versions
#   kernel_tests           tests/test_kernels.py with the Triton kernels compiled for the GPU (not interpreted)
#   study                  the whole digits study on CUDA (bf16, torch.compile, the Triton kernels inside the U-Net)
#   kernels                benchmarks/triton_kernels.py: fused GroupNorm(+SiLU) and attention vs PyTorch
#   ddpm                   benchmarks/ddpm.py: cifar10-preset training / sampling vs diffusers
#   diffusion_classifier   benchmarks/diffusion_classifier.py
#   sd                     benchmarks/sd.py: SD v1.4-sized U-Net at 512 px vs diffusers
# Results go to $OUT (default gpu-results/): summary.txt (one line a step: exit status, seconds), gpu.log (all
# output), ddpm.json, diffusion_classifier.json, study_REPORT.md. Copy the numbers into benchmarks/RESULTS.md with
# the card's name.
#
# The benchmarks' baseline is diffusers. On a GPU machine without network that has the rest (torch, triton,
# transformers), fetch it first where pip works (here for Python 3.12) and bring the .whl folder along:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# Only some steps again: STEPS="ddpm sd" bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
STEPS=${STEPS:-env kernel_tests study kernels ddpm diffusion_classifier sd}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME SECONDS COMMAND...: run it if NAME is in $STEPS, at most SECONDS, output to gpu.log
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (at most $limit s): $*" | tee -a "$OUT/gpu.log"
    timeout "$limit" "$@" >>"$OUT/gpu.log" 2>&1
    rc=$?
    echo "$name: exit $rc$([ $rc = 124 ] && echo ' (timed out)') after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

step env 20 sh -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'"
step kernel_tests 80 env TRITON_INTERPRET=0 "$PY" -m pytest -q -x tests/test_kernels.py
step study 200 "$PY" study.py --out /tmp/gpu-study --force --device cuda
cp /tmp/gpu-study/REPORT.md "$OUT/study_REPORT.md" 2>/dev/null
step kernels 45 "$PY" benchmarks/triton_kernels.py
step ddpm 100 "$PY" benchmarks/ddpm.py --json "$OUT/ddpm.json"
step diffusion_classifier 35 "$PY" benchmarks/diffusion_classifier.py --json "$OUT/diffusion_classifier.json"
step sd 75 "$PY" benchmarks/sd.py
cat "$OUT/summary.txt"
