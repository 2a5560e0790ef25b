#!/usr/bin/env bash
# A quick subset of the tests against the NEWEST jax, jaxlib, flax and optax on the package index, whatever
# pyproject.toml's upper bounds say: run it before widening those bounds (and record there the versions it
# prints). It keeps its own environment, so the main one stays on tested versions: $DCLS_JAX_NEWEST_VENV,
# default ~/.cache/dcls-jax/venv-newest, made with $DCLS_JAX_PYTHON, else the newest Python >= 3.12 on PATH or
# in pyenv (jax >= 0.11 needs 3.12). Each run upgrades those four packages, adds what the study and test extras
# need without touching them, and runs the subset below (or the pytest arguments given).
# On Python >= 3.12 the test extra's torch is the index's own build: a CUDA one of several GB on Linux x86_64.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DCLS_JAX_NEWEST_VENV:-$HOME/.cache/dcls-jax/venv-newest}"
fail() { echo "test_newest.sh: $*" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
  py="${DCLS_JAX_PYTHON:-}"
  if [ -z "$py" ]; then
    for candidate in python3.14 python3.13 python3.12 python3 \
        $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.*/bin/python3 2>/dev/null | sort -rV); do
      if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null
      then py="$candidate"; break; fi
    done
  fi
  [ -n "$py" ] || fail "no Python >= 3.12 found (the newest jax needs one): set DCLS_JAX_PYTHON"
  "$py" -m venv "$venv" || fail "could not create $venv with $py"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade jax jaxlib flax optax >&2 || fail "could not install the newest jax/flax/optax"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" -m pip freeze | grep -iE '^(jax|jaxlib|flax|optax)==' >"$work/hold.txt" || true
"$venv/bin/python" - "$root/pyproject.toml" >"$work/reqs.txt" <<'PY'
import sys, tomllib
extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print("\n".join(extras["study"] + extras["test"]))
PY
"$venv/bin/python" -c 'import torch' 2>/dev/null || echo "torch==2.13.0" >>"$work/hold.txt"
"${pip[@]}" -c "$work/hold.txt" -r "$work/reqs.txt" >&2 || fail "could not install the study and test extras"

cd "$root"
echo "test_newest.sh: $("$venv/bin/python" -c 'import sys, jax, jaxlib, flax, optax, torch
print(f"Python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"flax {flax.__version__}, optax {optax.__version__}, torch {torch.__version__}")')"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/dcls-jax/xla-newest}"
if [ "$#" -eq 0 ]; then
  # The DCLS layer against dcls 0.1.1, a DCLS model against timm, Grad-CAM against the study's PyTorch, the
  # metrics against scipy: the code that leans most on jax and flax.
  set -- tests/test_dcls.py tests/test_resnet.py tests/test_cam.py tests/test_metrics.py
fi
exec "$venv/bin/python" -m pytest -n 2 --dist loadfile -q "$@"
