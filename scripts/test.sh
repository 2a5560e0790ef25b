#!/usr/bin/env bash
# The test suite: sets up the environment with the test extra (scripts/setup.sh --test; DCLS_JAX_VENV and
# DCLS_JAX_EXTRAS apply) and runs pytest over tests/ from this checkout. Arguments go to pytest.
# Stops with set-up's status when set-up fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup.sh" --test | tail -n 1)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/dcls-jax/xla}"
exec "$venv/bin/python" -m pytest -n 2 --dist loadfile -q "$@"
