#!/usr/bin/env bash
# The accelerator run: correctness of the GPU convolution paths, then every benchmark at its GPU size, in one
# command (device time is scarce: about 10 minutes in all on an H100/H200). Raw outputs go to $OUT (default /tmp);
# copy them to benchmarks/results/ (h100_*.txt / h200_*.txt).
# Expects wheels for what the accelerator image lacks in .whl/ (dcls 0.1.1, simplejpeg; pytest is optional).
# Not flax: 0.12.8 does not import under the image's jax 0.11.2; its own flax 0.12.10 does.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-/tmp}
nvidia-smi -L
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in   # the floor's memory bandwidth, GB/s
  *H200*) gbs=4800 ;; *H100*PCIe*) gbs=2000 ;; *) gbs=3350 ;;
esac
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" python3 "$@" 2>&1 | tee "$out/$name.txt"; }
# 1. every depthwise implementation (Pallas Triton kernels natively) against lax, fp32 and bf16 (~1 min)
run check_conv 120 benchmarks/check_conv.py --big 128
# 2. per implementation and shape, fwd and fwd+bwd, fp32 and bf16, against PyTorch, with the floor fraction (~4 min)
run conv 280 benchmarks/bench_conv.py --batch 128 --dtypes fp32,bf16 --impls xla,fft,pallas --iters 5 --peak-gbs $gbs
# 3. the DCLS layer fwd+bwd at (128, 56, 56, 96), v0 17/34 (target <= 2.5 ms), auto and each forced path (~1.5 min)
for impl in auto fft pallas autotune; do   # autotune: times xla, shifted, fft and pallas first (2 shapes)
  DCLS_JAX_CONV=$impl run dcls_$impl $([ $impl = autotune ] && echo 80 || echo 40) benchmarks/bench_dcls.py --batch 128 --size 56 --channels 96 --iters 10
done
[ -f ~/.cache/dcls-jax/autotune.json ] && cp ~/.cache/dcls-jax/autotune.json "$out/autotune.json"
# 4. evaluation step (Grad-CAM + metrics) and bf16 train step, batch 128 / 64, against PyTorch (~4 min)
[ -f benchmarks/bench_evaluate.py ] && run evaluate 150 benchmarks/bench_evaluate.py --models resnet50,convnext_tiny_dcls --batch 64 --steps 5
[ -f benchmarks/bench_train.py ] && run train 120 benchmarks/bench_train.py --batch 128 --size 224 --precision bf16 --steps 5
exit 0
