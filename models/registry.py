"""The model registry: names -> `Entry` (models.entry), filled by the architecture files on first lookup.

    from models import registry
    registry.list_models()                        # every name (study_only=True: the study's 16 models)
    entry = registry.get_entry("resnet50_dcls")   # preprocessing, CAM target, published checkpoint ...
    model = registry.create_model("resnet50_dcls")
    registry.model_name(model)                    # "resnet50_dcls": models know their registry name
"""
from __future__ import annotations

import importlib

from flax import nnx

from models.entry import (IMAGENET_MEAN, IMAGENET_STD, MODELS, Checkpoint, Entry, Origin, infer_kernel_count,
                          override, register, register_test)

__all__ = ["FAMILIES", "IMAGENET_MEAN", "IMAGENET_STD", "MODELS", "Checkpoint", "Entry", "Origin", "create_model",
           "get_entry", "infer_kernel_count", "list_models", "model_name", "override", "register", "register_test"]


def get_entry(name: str) -> Entry:
    _load_families()
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}") from None


def list_models(*, study_only: bool = False) -> list[str]:
    """Every registered name (the tiny `test_*` variants of each family included), or only the study's 16 models."""
    _load_families()
    return sorted(n for n, e in MODELS.items() if e.in_study or not study_only)


def create_model(name: str, *, rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
    """Builds a registered model with random weights (use models.convert.from_state_dict for checkpoints)."""
    entry = get_entry(name)
    model = entry.builder(rngs=rngs if rngs is not None else nnx.Rngs(0), **overrides)
    model.registry_origin = Origin(name, overrides)
    return model


# The architecture files (models/<family>.py); importing one registers its entries. A new family is one file that
# registers its entries (and a tiny `test_*` variant, models.entry.register_test), its name here, and its test.
FAMILIES = ("resnet", "convnext", "metaformer", "fastvit")


def _load_families():
    for family in FAMILIES:
        importlib.import_module(f"models.{family}")


def model_name(model: nnx.Module) -> str | None:
    """The registry name a model was built with (by create_model, from_state_dict or restore), else None."""
    origin = getattr(model, "registry_origin", None)
    return origin.name if isinstance(origin, Origin) else None
