"""The evaluation layer: joins models, cam and data (dcls_jax <- models <- cam <- evaluation <- evaluate.py,
train.py; data beside).

    from evaluation import checkpoints, metrics, protocols
    from evaluation.evaluator import Evaluator
    model, source, sha256 = checkpoints.load_model("resnet50_dcls")          # published: downloaded, converted once
    ev = Evaluator(model, methods=("gradcam", "threshold_gradcam"), protocol="study")
    for batch, out in ev.run(batches):   # batches of data.pipeline.batches; out: {method: {metric: (B,)}, ...}
        ...
    summary = ev.summary()               # {"cams": {method: {"score", "mean_rho", "dice", "iou", ...}}, "accuracy"}
    metrics.register_metric("mae", lambda cam, human: abs(cam - human).mean((1, 2)))   # a new metric: one entry

Modules: `metrics` (the registry of alignment metrics and their reducers), `protocols` (how a CAM is put next to
the human map), `evaluator` (Evaluator: the jitted, sharded step, precision, accuracy; Explainer: the predictions
and CAMs of single photos), `checkpoints` (the published-checkpoint lookup: download, verify, convert once into the
cache), `runtime` (progress bars, atomic writes, multi-host flags, the programs' malloc settings).
The constants below are what the command lines need before JAX is imported (the modules import JAX)."""
from pathlib import Path

STUDY_METHODS = ("gradcam", "threshold_gradcam")   # the study's two CAM methods (cam.METHOD_NAMES has them all)
PROTOCOLS = ("study", "corrected")                  # see evaluation.protocols
# "highest": float32 matmuls/convolutions at full precision on every backend (the tests' and the README's
# tolerances); "default": the backend's default (bfloat16 / TF32 passes on TPUs and recent GPUs); "bfloat16": the
# parameters and images cast to bfloat16 (CAMs and metrics stay float32). See evaluation.evaluator.
PRECISIONS = ("highest", "default", "bfloat16")
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"   # the bundled ClickMe-format sample
