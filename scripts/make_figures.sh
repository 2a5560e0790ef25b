#!/usr/bin/env bash
# The README's result figures, from the bundled sample, offline:
#
#     bash scripts/make_figures.sh                  # resnet50 and resnet50_dcls (default)
#     bash scripts/make_figures.sh caformer_s18,caformer_s18_dcls,resnet50,resnet50_dcls
#
# Writes docs/sample_overlay.png (one labelled overlay: image | model map | human map), docs/sample_table.png (the
# study's table plot: alignment score per architecture with and without DCLS, per CAM method) and
# docs/sample_results.json (the evaluate.py result they come from). The sample's human maps are SYNTHETIC and the
# weights random (--random-init; no checkpoint is downloaded): the figures show what the tools draw, not results.
# PYTHON selects the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODELS=${1:-resnet50,resnet50_dcls}
FIRST=${MODELS%%,*}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ROOT=$PWD
case "$PY" in /*) ;; */*) PY="$ROOT/$PY" ;; esac   # a relative interpreter path still works from $OUT
# run in $OUT with relative output paths: the JSON's config records them as given, and no temporary path goes to docs/
(cd "$OUT" && "$PY" "$ROOT/evaluate.py" --models "$MODELS" --sample --random-init --cam gradcam,threshold_gradcam \
    --overlays overlays --num-overlays 2 --output results.json --plot table.png --no-progress)
mkdir -p docs
cp "$OUT/overlays/${FIRST}_000000_threshold_gradcam.png" docs/sample_overlay.png
cp "$OUT/table.png" docs/sample_table.png
cp "$OUT/results.json" docs/sample_results.json
chmod 644 docs/sample_overlay.png docs/sample_table.png docs/sample_results.json
ls -l docs/sample_overlay.png docs/sample_table.png docs/sample_results.json
