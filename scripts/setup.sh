#!/usr/bin/env bash
# Creates (once) the project's virtual environment and installs the pinned dependencies of pyproject.toml;
# `--test` adds the test-only references (torch, timm, dcls, grad-cam). Re-running installs only what is
# missing, so CI and repeated runs reuse what is already there.
# The environment lives in $DCLS_JAX_VENV (default ~/.cache/dcls-jax/venv); the project itself runs from
# this checkout (PYTHONPATH), never from a copy in the environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DCLS_JAX_VENV:-$HOME/.cache/dcls-jax/venv}"
extras=""
[ "${1:-}" = "--test" ] && extras="test"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
reqs="$(mktemp)"
"$venv/bin/python" - "$root/pyproject.toml" "$extras" >"$reqs" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = list(project["dependencies"])
if sys.argv[2]:
    deps += project["optional-dependencies"][sys.argv[2]]
print("\n".join(deps))
PY
# Fast path: nothing to install when every requirement is already satisfied.
if ! "$venv/bin/python" - "$reqs" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
from packaging.requirements import Requirement
for line in open(sys.argv[1]):
    if line.strip():
        r = Requirement(line)
        if not r.specifier.contains(version(r.name), prereleases=True):
            sys.exit(1)
PY
then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$reqs"
fi
rm -f "$reqs"
echo "$venv"
