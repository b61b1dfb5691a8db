#!/usr/bin/env bash
# Installs what `--features mpi` needs to build and its tests need to run, when missing:
# Open MPI (mpirun and the library) and libclang (the `mpi` crate's bindgen reads mpi.h).
# Idempotent: does nothing when everything is there. Needs root (or sudo) and apt on Debian
# or Ubuntu; elsewhere, install Open MPI (or MPICH) and libclang with the system's packages.
#
#   scripts/install_mpi.sh && cargo test -p softprompt-cli --features mpi --test mpi
set -euo pipefail

packages=(openmpi-bin libopenmpi-dev libclang-dev)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_mpi: ${packages[*]} already installed" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_mpi: apt-get not found: install ${missing[*]} (Open MPI and libclang) by hand" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
    echo "install_mpi: not root and no sudo: install ${missing[*]} as root" >&2
    exit 1
  fi
fi
echo "install_mpi: installing ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}"
