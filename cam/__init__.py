"""Class activation maps (the study's Grad-CAM and Threshold-Grad-CAM, the pytorch-grad-cam family, saliency).

    import cam
    maps = cam.grad_cam(model, images, labels)                 # (B, H, W) float32, study definition
    maps = cam.grad_cam(my_model, images, layer="stages.3")    # any NNX model, any layer path (or a submodule)
    maps = cam.grad_cam(vit, images, layer="blocks.11.norm1")  # token sequences: class token dropped, grid inferred
    maps = cam.grad_cam(model, images)                         # labels=None: each image's top prediction
    maps = cam.grad_cam(model, images, lambda z: z[:, 3] - z[:, 5])   # any score on the logits
    maps = cam.METHODS["layercam"](model, images, labels)      # any of cam.METHOD_NAMES
    f = jax.jit(cam.make_cam_fn(graphdef, "threshold_gradcam"))  # pure: f(state, images, labels)
    skip = cam.is_degenerate(maps)                              # constant or NaN maps, for the metric
    cam.faithfulness.deletion(apply, images, maps, labels)      # deletion / insertion / drop / ROAD
    cam.overlay.save_overlay("x.png", image, maps[0], human_map)

See cam/methods.py for the exact definitions, normalisations and the degenerate-map policy, cam/capture.py for
targets at any layer, cam/faithfulness.py for the faithfulness metrics.
"""
import importlib

from cam import capture
from cam.capture import module_paths, target_path
from cam.methods import (FEATURE_MAPS, METHOD_NAMES, METHODS, NATIVE, activations_and_grads, cam_from_model,
                         check_labels, compute, grad_cam, input_grads, is_degenerate, make_cam_fn, make_cams_fn, resize,
                         threshold_grad_cam)

__all__ = ["capture", "module_paths", "target_path", "FEATURE_MAPS", "METHOD_NAMES", "METHODS", "NATIVE", "activations_and_grads", "cam_from_model", "check_labels",
           "compute", "grad_cam", "input_grads", "is_degenerate", "make_cam_fn", "make_cams_fn", "resize", "threshold_grad_cam"]


def __getattr__(name):
    # Submodules on first use: cam.overlay (PIL), cam.metrics, cam.figures (matplotlib), cam.faithfulness.
    if name in ("overlay", "metrics", "figures", "faithfulness"):
        return importlib.import_module(f"cam.{name}")
    raise AttributeError(f"module 'cam' has no attribute {name!r}")
