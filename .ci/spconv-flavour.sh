#!/usr/bin/env bash
# Print the spconv package to install for interpreter $1 on this machine.
#
# SPARK_SPCONV, when set, is printed as it is. Without it, the choice follows the CUDA
# version that nvidia-smi reports. No version gives the CPU wheel spconv. CUDA 12.0 gives
# spconv-cu120 on Python 3.11 or older. Newer versions give spconv-cu121, -cu124 or
# -cu126, the newest one not above the driver's version, because a driver runs wheels
# built for an older CUDA 12. Exits 1 with a message when no flavour fits.
set -euo pipefail

if [ -n "${SPARK_SPCONV:-}" ]; then
  echo "$SPARK_SPCONV"
  exit 0
fi

cuda=""
if command -v nvidia-smi >/dev/null 2>&1; then
  cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)" || cuda=""
fi
if [ -z "$cuda" ]; then
  echo spconv
  exit 0
fi

major="${cuda%%.*}"
minor="${cuda#*.}"
python_minor="$("${1:-python3}" -c 'import sys; print(sys.version_info[1])')"
if [ "$major" -lt 12 ]; then
  echo "spconv-flavour.sh: error: no spconv flavour is chosen for CUDA $cuda; set SPARK_SPCONV to a spconv package built for it" >&2
  exit 1
elif [ "$major" -eq 12 ] && [ "$minor" -eq 0 ]; then
  if [ "$python_minor" -le 11 ]; then
    echo spconv-cu120
  else
    echo "spconv-flavour.sh: error: spconv-cu120 (CUDA 12.0) has no wheel for Python 3.$python_minor; update the driver to CUDA 12.1 or newer, or set SPARK_SPCONV" >&2
    exit 1
  fi
elif [ "$major" -eq 12 ] && [ "$minor" -lt 4 ]; then
  echo spconv-cu121
elif [ "$major" -eq 12 ] && [ "$minor" -lt 6 ]; then
  echo spconv-cu124
else
  echo spconv-cu126
fi
