#!/usr/bin/env bash
# Install portable-attn for one device, as the Dockerfiles and CI do:
#
#   ci/install.sh cpu|cuda|rocm|xpu|tpu [EXTRA ...]      e.g. `ci/install.sh cpu dev`
#
# cpu, tpu and xpu get torch==$TORCH_VERSION from PyTorch's CPU or XPU index first (an unpinned torch
# from PyPI is a CUDA build of several GB). The cuda and rocm images bring their own torch and triton.
# Whatever torch/triton is installed then is pinned as a constraint, so pip only adds what is missing
# and fails rather than swap a vendor build. Each device installs the extras that its matrix.yaml
# entries list (tests/test_ci.py checks this).
#
# Environment: PYTHON (default python3), TORCH_VERSION, TORCH_INDEX (overrides the device's torch
# index; empty: PyPI and local wheels only), JAX_VERSION, TRITON_VERSION, EDITABLE=1 (pip -e),
# DRY_RUN=1 (print the pip commands, run nothing).
set -euo pipefail

usage="usage: ci/install.sh cpu|cuda|rocm|xpu|tpu [EXTRA ...]"
if (($# < 1)); then echo "$usage" >&2; exit 2; fi
device="$1"
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
torch_version="${TORCH_VERSION:-2.13.0}"
jax_version="${JAX_VERSION:-0.10.2}"        # the jax that CI's interpret mode runs (docs/pitfalls.md)
triton_version="${TRITON_VERSION:-3.9.0}"   # only where no vendor triton is installed

case "$device" in
  cpu)  extras=(interpret pallas-interpret onnx); torch_index=https://download.pytorch.org/whl/cpu ;;  # the interpreters
  tpu)  extras=(tpu);       torch_index=https://download.pytorch.org/whl/cpu ;;
  xpu)  extras=(xpu);       torch_index=https://download.pytorch.org/whl/xpu ;;  # brings Triton's XPU backend
  cuda) extras=(cuda);      torch_index="" ;;                                    # torch from the image
  rocm) extras=(rocm);      torch_index="" ;;                                    # torch from the image
  *) echo "ci/install.sh: unknown device '$device'; $usage" >&2; exit 2 ;;
esac
extras+=("$@")
torch_index="${TORCH_INDEX-$torch_index}"

pip_install() {
  echo "+ $python -m pip install $*"
  if [[ -z "${DRY_RUN:-}" ]]; then "$python" -m pip install "$@"; fi
}

if [[ "$device" == cpu || "$device" == tpu || "$device" == xpu ]]; then
  pip_install "torch==$torch_version" ${torch_index:+--extra-index-url "$torch_index"}
elif ! "$python" -c 'import torch' 2>/dev/null; then
  echo "ci/install.sh: the $device base image provides torch, but $python cannot import it" >&2
  exit 1
fi

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$python" -m pip list --format=freeze 2>/dev/null \
  | grep -E '^(torch|triton|triton-xpu|pytorch-triton(-[a-z]+)?)==' >"$constraints" || true
grep -qE '^(triton|triton-xpu|pytorch-triton(-[a-z]+)?)==' "$constraints" || echo "triton==$triton_version" >>"$constraints"
echo "jax==$jax_version" >>"$constraints"   # jax pins its own jaxlib (and libtpu for jax[tpu])
echo "constraints: $(tr '\n' ' ' <"$constraints")"

editable=()
if [[ -n "${EDITABLE:-}" ]]; then editable=(-e); fi
spec="$root"
if ((${#extras[@]})); then spec="${root}[$(IFS=,; echo "${extras[*]}")]"; fi
pip_install -c "$constraints" "${editable[@]}" "$spec"
