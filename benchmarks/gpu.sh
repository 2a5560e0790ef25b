#!/usr/bin/env bash
# The accelerator run: every benchmark at its GPU size, in one command (device time is scarce).
# Expects wheels for what the accelerator image lacks in .whl/ (dcls 0.1.1, simplejpeg). Not flax: 0.12.8 does not
# import under the image's jax 0.11.2; its own flax 0.12.10 does.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-/tmp}
nvidia-smi -L
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" python3 "$@" 2>&1 | tee "$out/$name.txt"; }
run dcls 50 benchmarks/bench_dcls.py --batch 128 --size 56 --channels 96 --iters 10
[ -f benchmarks/bench_evaluate.py ] && run evaluate 150 benchmarks/bench_evaluate.py --models resnet50,convnext_tiny_dcls --batch 64 --steps 5
[ -f benchmarks/bench_train.py ] && run train 100 benchmarks/bench_train.py --batch 128 --size 224 --precision bf16 --steps 5
exit 0
