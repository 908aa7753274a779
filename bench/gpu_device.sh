#!/usr/bin/env bash
# Run bench/gpu.py on a bare CUDA machine without network, keeping its report.
#
#   bench/gpu_device.sh OUTDIR [bench/gpu.py arguments, e.g. --only stage2,attention]
#
# gpu_wheels/ (`make gpu-wheels` on a machine with network: PyAV and torchdata, which a CUDA
# image with torch usually lacks) --pip install --no-index --target--> OUTDIR/site, put on
# PYTHONPATH after the work tree; then the device is described, and bench/gpu.py's output goes
# to the terminal and to OUTDIR/gpu_report.txt. Exits with the benchmark's exit code. A wheel
# that does not install is reported and skipped.
# Without gpu_wheels/ it says so and runs with what is installed (the loader section then
# fails for want of torchdata; the others run). PYTHON picks the interpreter (python3),
# GPU_WHEELS another wheel folder.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bench/gpu_device.sh OUTDIR [bench/gpu.py arguments]" >&2
    exit 2
fi
outdir=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
wheels=${GPU_WHEELS:-$root/gpu_wheels}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
site=$outdir/site

install_wheels() {
    local found=("$wheels"/*.whl) wheel use_pip=1
    if [ ! -e "${found[0]}" ]; then
        echo "no wheels in $wheels (run 'make gpu-wheels' where there is network): skipping" \
            "the install; PyAV and torchdata come only from what is installed"
        return
    fi
    echo "installing ${#found[@]} wheel(s) from $wheels into $site (no network, no deps)"
    "$python" -m pip --version >/dev/null 2>&1 || use_pip=0
    # One wheel at a time: one that does not fit this machine (an older glibc, another Python)
    # leaves the others installed, and the bench still runs what does not need it.
    for wheel in "${found[@]}"; do
        if [ "$use_pip" = 1 ]; then
            "$python" -m pip install --quiet --upgrade --no-index --no-deps \
                --find-links "$wheels" --target "$site" "$wheel"
        else
            # No pip: a wheel is a zip archive laid out for site-packages.
            "$python" -m zipfile -e "$wheel" "$site"
        fi && echo "  installed ${wheel##*/}" || echo "  could not install ${wheel##*/}: skipped"
    done
}

describe_device() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi
    else
        echo "nvidia-smi not found"
    fi
    "$python" - <<'EOF'
import importlib.util
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        print(f"cuda:{index} {p.name}, {p.total_memory / 2**30:.1f} GiB, "
              f"capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
else:
    print("no CUDA device visible to torch")
for name in ("av", "torchdata", "flash_attn", "transformers", "skimage"):
    spec = importlib.util.find_spec(name)
    print(f"  {name}: {'found at ' + str(spec.origin) if spec else 'not installed'}")
EOF
}

cd "$root" || exit 2
install_wheels 2>&1 | tee "$outdir/install.txt"
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
describe_device 2>&1 | tee "$outdir/device.txt"
"$python" bench/gpu.py "$@" 2>&1 | tee "$outdir/gpu_report.txt"
code=${PIPESTATUS[0]}
echo "bench/gpu.py exited with $code; report in $outdir/gpu_report.txt"
exit "$code"
