# Select a Python that has the project's packages, installing them into a project-local .venv when needed.
#
# Sourced by run.sh and .ci/run (bash). Exports PYTHON, the interpreter to use, and puts its
# directory first on PATH. The current python3 is used when it imports everything (the fast
# path, no pip), else the project's .venv when that does. Otherwise pip installs into .venv,
# created when missing: torch and torchvision pinned per machine architecture, the project
# with its test extras, and one spconv flavour.
#
# SPARK_SPCONV chooses the spconv package explicitly (spconv, spconv-cu120, spconv-cu121,
# spconv-cu124 or spconv-cu126); otherwise spconv-flavour.sh chooses by the CUDA version.
# All flavours install the import name spconv, so the others are uninstalled first.

SPARK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SPARK_SPCONV_FLAVOURS=(spconv spconv-cu120 spconv-cu121 spconv-cu124 spconv-cu126)

spark_env_error() {
  echo "env.sh: error: $1" >&2
}

# Succeed when interpreter $1 imports every package (and SPARK_SPCONV's flavour, when set, is the one installed).
spark_env_ready() {
  [ -x "$1" ] || command -v "$1" >/dev/null 2>&1 || return 1
  "$1" - >/dev/null 2>&1 <<'PY'
import importlib
import importlib.metadata
import os

for name in ("torch", "torchvision", "timm", "rich", "numpy", "skimage", "matplotlib", "pytest", "spconv.pytorch"):
    importlib.import_module(name)
if os.environ.get("SPARK_SPCONV"):
    importlib.metadata.version(os.environ["SPARK_SPCONV"])
PY
}

# Create .venv when missing and install everything into it.
spark_install() {
  local venv="$SPARK_ROOT/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    echo "env.sh: creating $venv" >&2
    python3 -m venv "$venv" || return 1
  fi
  local python="$venv/bin/python"

  local flavour
  flavour="$(bash "$SPARK_ROOT/.ci/spconv-flavour.sh" "$python")" || return 1
  local others=() name
  for name in "${SPARK_SPCONV_FLAVOURS[@]}"; do
    [ "$name" = "$flavour" ] || others+=("$name")
  done

  # torch and torchvision are pinned in pairs that import together (PyPI's newest torchvision
  # does not import beside every torch).
  local torch_pins
  case "$(uname -m)" in
    x86_64) torch_pins=(torch==2.14.1 torchvision==0.29.1) ;;
    aarch64) torch_pins=(torch==2.9.1 torchvision==0.24.1) ;;
    *) torch_pins=(torch torchvision) ;;
  esac

  echo "env.sh: installing ${torch_pins[*]}, the project and $flavour into $venv" >&2
  "$python" -m pip install --progress-bar off "${torch_pins[@]}" || return 1
  "$python" -m pip uninstall --yes "${others[@]}" >/dev/null 2>&1
  "$python" -m pip install --progress-bar off -e "$SPARK_ROOT[test]" "$flavour" || return 1
}

spark_activate() {
  if spark_env_ready python3; then
    PYTHON="$(command -v python3)"
  elif spark_env_ready "$SPARK_ROOT/.venv/bin/python"; then
    PYTHON="$SPARK_ROOT/.venv/bin/python"
  else
    spark_install || { spark_env_error "installing the packages into $SPARK_ROOT/.venv failed; see pip's output above"; return 1; }
    PYTHON="$SPARK_ROOT/.venv/bin/python"
    if ! spark_env_ready "$PYTHON"; then
      spark_env_error "$PYTHON still cannot import torch, torchvision, timm, rich, numpy, skimage, matplotlib, pytest and spconv"
      return 1
    fi
  fi
  export PYTHON
  PATH="$(dirname "$PYTHON"):$PATH"
  export PATH
}

spark_activate
