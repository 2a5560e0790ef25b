#!/usr/bin/env bash
# Makes (once) a virtual environment for this checkout and installs what pyproject.toml asks for: the library's
# dependencies and the study extra, plus `--test` (the PyTorch references), `--cuda12`, `--cuda13` or `--tpu`
# (JAX's accelerator extras; also taken from DCLS_JAX_EXTRAS, e.g. DCLS_JAX_EXTRAS=cuda12). The checkout itself
# is not installed: the study runs from here (scripts/test.sh puts it on PYTHONPATH).
#
# - Nothing to install: a check of the installed versions (standard library + pip's own `packaging`) and
#   nothing else, well under a second.
# - What is installed and inside pyproject's ranges stays: jax, jaxlib, flax, a CUDA or TPU plugin and torch
#   are held at their installed versions while the missing pieces are added, and an installed CUDA/TPU
#   plugin brings its jax extra along, so a GPU jax is never replaced or left mismatched.
# - Any failure stops with a non-zero status and prints nothing on stdout.
# On success the last line on stdout is the environment's folder: $DCLS_JAX_VENV, default
# ~/.cache/dcls-jax/venv (kept outside the checkout so fresh clones, CI's among them, reuse it).
# The Python that makes a new environment: $DCLS_JAX_PYTHON, default python3 (>= 3.11).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DCLS_JAX_VENV:-$HOME/.cache/dcls-jax/venv}"
extras="study${DCLS_JAX_EXTRAS:+,$DCLS_JAX_EXTRAS}"
for arg in "$@"; do
  case "$arg" in
    --test) extras="$extras,test" ;;
    --cuda12|--cuda13|--tpu) extras="$extras,${arg#--}" ;;
    *) echo "setup.sh: unknown option '$arg' (--test, --cuda12, --cuda13, --tpu)" >&2; exit 2 ;;
  esac
done
fail() { echo "setup.sh: $*" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
  py="${DCLS_JAX_PYTHON:-python3}"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || fail "$py is missing or older than Python 3.11 (set DCLS_JAX_PYTHON to a Python >= 3.11)"
  echo "setup.sh: creating $venv with $("$py" -V 2>&1)" >&2
  "$py" -m venv "$venv" || fail "could not create the virtual environment $venv"
fi
"$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "$venv runs $("$venv/bin/python" -V 2>&1); the project needs Python >= 3.11"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# check.py: exit 0 when every requirement (with its own dependencies, transitively) is installed at a version
# inside its range; otherwise writes the requirements (reqs.txt) and the versions to hold (hold.txt).
cat >"$work/check.py" <<'PY'
import sys, tomllib
from importlib import metadata
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:                    # pip's vendored copy: in every venv made with pip
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

pyproject, extras, work = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
project = tomllib.load(open(pyproject, "rb"))["project"]
optional = project["optional-dependencies"]

dists = {}                             # one scan of the environment
for dist in metadata.distributions():
    dists.setdefault(canonicalize_name(dist.metadata["Name"] or ""), dist)

def installed(name):
    dist = dists.get(canonicalize_name(name))
    return dist.version if dist is not None else None

def requirements(extras):
    reqs = list(project["dependencies"])
    for extra in extras:
        if extra not in optional:
            sys.exit(f"setup.sh: pyproject.toml has no extra '{extra}' (it has: {', '.join(optional)})")
        reqs += optional[extra]
    reqs = [Requirement(r) for r in reqs]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]

# A jax outside the supported range gets replaced: an installed CUDA/TPU plugin then comes along through
# its jax extra, so it is not left mismatched. A jax inside the range is held below, its plugin with it.
jax_range = next(r.specifier for r in requirements([]) if canonicalize_name(r.name) == "jax")
if installed("jax") is None or not jax_range.contains(installed("jax"), prereleases=True):
    for plugin, extra in (("jax-cuda12-plugin", "cuda12"), ("jax-cuda13-plugin", "cuda13"), ("libtpu", "tpu")):
        if installed(plugin) and extra not in extras:
            extras.append(extra)
wanted = requirements(extras)

problems, seen = [], set()
def check(req, parent_extras=("",)):
    if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in parent_extras):
        return
    version = installed(req.name)
    if version is None or not req.specifier.contains(version, prereleases=True):
        problems.append(f"{req} (installed: {version or 'none'})")
        return
    key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
    if key in seen:
        return
    seen.add(key)
    for sub in dists[canonicalize_name(req.name)].requires or []:
        check(Requirement(sub), tuple(req.extras) or ("",))
for req in wanted:
    check(req)
if not problems:
    sys.exit(0)

ranges = {canonicalize_name(r.name): r.specifier for r in wanted}
hold = []
for name in ("jax", "jaxlib", "flax", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
             "jax-cuda13-pjrt", "libtpu", "torch", "torchvision"):
    version = installed(name)
    if version is not None and ranges.get(name, None) is not None and not ranges[name].contains(version, True):
        continue                       # outside the supported range: pip replaces it
    if version is not None:
        hold.append(f"{name}=={version}")
if installed("torch") is None and "test" in extras:
    hold += ["torch==2.13.0", "torchvision==0.28.0"]   # the CPU build where the machine or index has one
if installed("jax") is not None and not any(h.startswith("jax==") for h in hold):
    hold = [h for h in hold if not h.startswith(("jaxlib==", "jax-cuda", "libtpu=="))]
open(f"{work}/reqs.txt", "w").write("\n".join(map(str, wanted)) + "\n")
open(f"{work}/hold.txt", "w").write("\n".join(hold) + "\n")
print("setup.sh: to install or update: " + "; ".join(problems), file=sys.stderr)
if hold:
    print("setup.sh: pip constraints (installed versions kept; torch 2.13.0 where none): " + ", ".join(hold), file=sys.stderr)
sys.exit(1)
PY

if ! "$venv/bin/python" "$work/check.py" "$root/pyproject.toml" "$extras" "$work"; then
  [ -f "$work/reqs.txt" ] || fail "cannot read the requirements (see above)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$work/hold.txt" -r "$work/reqs.txt" >&2 \
    || fail "pip could not install the requirements into $venv (see its message above)"
  "$venv/bin/python" "$work/check.py" "$root/pyproject.toml" "$extras" "$work" \
    || fail "after pip install, $venv still misses the requirements listed above"
fi
echo "$venv"
