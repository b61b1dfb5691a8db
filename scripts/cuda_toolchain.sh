#!/usr/bin/env bash
# A CUDA 13.0 toolkit for building softprompt with `--features cuda`, from NVIDIA's PyPI wheels
# (nvcc, headers, cuBLAS, cuRAND, NVRTC, the runtime), unpacked into a cache folder. No GPU, no
# driver and no root are needed to build; running needs an NVIDIA driver for CUDA 13 (580 or
# newer).
#
#   eval "$(scripts/cuda_toolchain.sh)"      # fetch once (about 650 MB of wheels), then export
#   cargo build -p softprompt --features cuda --benches
#
# Prints `export` lines for PATH, CUDA_ROOT/CUDA_HOME/CUDA_PATH, NVCC, CUDARC_CUDA_VERSION,
# LD_LIBRARY_PATH and (without nvidia-smi) CUDA_COMPUTE_CAP; everything else goes to stderr.
# Environment: SOFTPROMPT_CUDA_CACHE (default .cache/cuda in the repository, gitignored),
# CUDA_COMPUTE_CAP (default 90, an H100/H200, when no GPU can be queried).
#
# What the build needs and where it comes from:
# - candle-kernels compiles its .cu files with nvcc (through the cudaforge crate): nvcc,
#   cudafe++, ptxas, fatbinary, cicc and libdevice (nvidia-cuda-nvcc, nvidia-nvvm), the CUDA
#   headers (nvidia-cuda-runtime, nvidia-cuda-crt) and CCCL's thrust/cub (nvidia-cuda-cccl).
#   Only the CUDA 13 wheels ship the nvcc driver itself (the -cu12 ones have ptxas only), and
#   they all unpack into one tree, nvidia/cu13, which serves as CUDA_ROOT.
# - cudarc reads the CUDA version from `nvcc --version` and, with the `dynamic-linking` feature
#   candle turns on, links libcuda, libnvrtc, libcurand, libcublas, libcublasLt and libcudart.
#   The wheels carry only the versioned .so files: the unversioned names are added as links.
# - libcuda.so belongs to the driver, not to the toolkit, and no wheel has it: a stub is
#   built from the symbol names in cuda.h into lib/stubs (a path cudarc searches), with the
#   driver's soname libcuda.so.1, so the binary loads the real driver at run time. The stub
#   folder is never put on LD_LIBRARY_PATH.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SOFTPROMPT_CUDA_CACHE:-$root/.cache/cuda}
version=13.0
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
cuda=$cache/cu13
stamp=$cuda/.softprompt-toolkit
want="${wheels[*]}"

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "cuda_toolchain: fetching CUDA $version wheels into $cache/wheels" >&2
  mkdir -p "$cache/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$cache/wheels" "${wheels[@]}" >&2
  rm -rf "$cache/unpack" "$cuda"
  mkdir -p "$cache/unpack"
  for spec in "${wheels[@]}"; do
    name=${spec%%==*}; ver=${spec#*==}
    whl=$(ls "$cache/wheels/${name//-/_}-$ver-"*.whl)
    python3 -m zipfile -e "$whl" "$cache/unpack/"
  done
  mv "$cache/unpack/nvidia/cu13" "$cuda"
  rm -rf "$cache/unpack"
  # Zip archives drop the executable bits.
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/* 2>/dev/null || true
  # nvcc.profile looks for headers and libraries under targets/x86_64-linux, as installed by
  # NVIDIA's packages; the wheels keep them at the top.
  mkdir -p "$cuda/targets/x86_64-linux"
  ln -sfn ../../include "$cuda/targets/x86_64-linux/include"
  ln -sfn ../../lib "$cuda/targets/x86_64-linux/lib"
  ln -sfn lib "$cuda/lib64"
  for so in "$cuda"/lib/lib*.so.*; do
    base=${so%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
  done
  # The driver stub: every cu* entry point that cuda.h declares or renames to (the _v2 ... and
  # per-thread-stream _ptds/_ptsz variants), as empty functions.
  mkdir -p "$cuda/lib/stubs"
  python3 - "$cuda/include/cuda.h" "$cuda/lib/stubs/libcuda_stub.c" <<'PY'
import re, sys
h = open(sys.argv[1]).read()
names = set(re.findall(r"CUDAAPI\s+(cu[A-Z]\w*)\s*\(", h))
names |= set(re.findall(r"#define\s+cu[A-Z]\w*\s+(cu[A-Z]\w*)\b", h))
for api in re.findall(r"__CUDA_API_PT[DS]S\w*\((cu[A-Z]\w*)\)", h):
    names |= {api, api + "_ptds", api + "_ptsz"}
with open(sys.argv[2], "w") as f:
    f.write("/* Link-time stand-in for the driver's libcuda.so.1 (generated from cuda.h). */\n")
    for n in sorted(names):
        f.write(f"void {n}(void) {{}}\n")
PY
  ${CC:-cc} -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" \
    "$cuda/lib/stubs/libcuda_stub.c"
  "$cuda/bin/nvcc" --version >&2
  echo "$want" > "$stamp"
fi

cap=${CUDA_COMPUTE_CAP:-}
if [ -z "$cap" ] && ! nvidia-smi --query-gpu=compute_cap --format=csv,noheader >/dev/null 2>&1; then
  cap=90
fi
echo "export CUDA_ROOT='$cuda' CUDA_HOME='$cuda' CUDA_PATH='$cuda' NVCC='$cuda/bin/nvcc'"
echo "export CUDARC_CUDA_VERSION=13000"
echo "export PATH='$cuda/bin':\"\$PATH\""
echo "export LD_LIBRARY_PATH='$cuda/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
[ -z "$cap" ] || echo "export CUDA_COMPUTE_CAP=$cap"
