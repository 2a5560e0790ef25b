"""The sixteen models of the study (eight architectures, with and without DCLS) in Flax NNX.

    import models
    from models import convert
    model = models.create_model("resnet50_dcls")           # random weights
    model = convert.load("resnet50_dcls", "ckpt.pth")       # PyTorch checkpoint -> JAX
    logits = model(x)                                       # x: (B, H, W, 3) normalised, NHWC
    feats = model.forward_features(x)                       # the study's CAM target layer, NHWC
    logits = model.forward_head(feats)
"""
from models.registry import MODELS, Entry, create_model, get_entry, list_models, register

__all__ = ["MODELS", "Entry", "create_model", "get_entry", "list_models", "register"]
