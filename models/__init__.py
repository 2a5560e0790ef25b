"""The study's models (eight architectures, with and without DCLS) in Flax NNX: the registry, one file per family
(resnet, convnext, metaformer, fastvit), their shared layers and the torch-free checkpoint converter.

    import jax.numpy as jnp
    import models
    from models import convert                        # the converter (`import models` alone does not load it)

    models.list_models(study_only=True)               # the study's 16 names (list_models(): every registered one)
    entry = models.get_entry("resnet50_dcls")         # preprocessing, CAM target, published checkpoint ...
    model = models.create_model("test_resnet_dcls")   # random weights; a tiny test variant, quick to build
    x = jnp.zeros((2, 64, 64, 3))                     # normalised images, NHWC
    logits = model(x)                                 # (2, 10)
    feats = model.forward_features(x)                 # the activations at model.target_layer, the CAM target
    assert jnp.allclose(model.forward_head(feats), logits)
    # convert.load("resnet50_dcls", "ckpt.pth") builds a model from a PyTorch checkpoint (or a URL, or an orbax
    # directory written by convert.save); convert.from_state_dict(name, state_dict) from a dict of numpy arrays.

Where each thing is stated: the model surface (forward_features, forward_head, layer_names, target_layer) in
`models.layers.CutModel`; the convolution DCLS replaces (every family's `Config.conv`) in `models.layers.ConvSpec`;
what a registry entry holds in `models.entry.Entry`; the list of family files in `models.registry.FAMILIES`.
"""
from models.registry import MODELS, Entry, create_model, get_entry, list_models, register

__all__ = ["MODELS", "Entry", "create_model", "get_entry", "list_models", "register"]
