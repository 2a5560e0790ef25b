"""PyTorch-side helpers shared by the parity tests (test-only: torch, timm and dcls are references)."""
from __future__ import annotations

import numpy as np
import torch


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters: default (0, 1) stats hide swapped mean/var."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def randomize_params(model: torch.nn.Module, names: tuple[str, ...], seed: int = 0, scale: float = 0.5):
    """Overwrite parameters whose name ends with one of `names` (e.g. layer-scale gammas initialised at 1e-6,
    which would make a block's branch invisible to a parity test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in names:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def dclsify(stages: list[list[tuple[torch.nn.Module, str]]], *, kernel_count: int, dilated_kernel_size: int,
            version: str, bias: bool | None = None, seed: int = 0) -> None:
    """Replace convolutions by dcls.Dcls2d, positions (and SIG) shared per stage, as the published models do.

    stages: for each stage, the (parent module, attribute name) of each conv to replace, in order. Each new
    layer keeps the conv's channels, groups, stride and bias; padding = dilated_kernel_size // 2. The first
    layer of a stage owns P (and SIG); the others point at the same Parameter.
    """
    from DCLS.construct.modules import Dcls2d

    torch.manual_seed(seed)
    for stage in stages:
        first = None
        for parent, attr in stage:
            conv = getattr(parent, attr)
            layer = Dcls2d(conv.in_channels, conv.out_channels, kernel_count=kernel_count,
                           stride=conv.stride, padding=dilated_kernel_size // 2,
                           dilated_kernel_size=dilated_kernel_size, groups=conv.groups,
                           bias=(conv.bias is not None) if bias is None else bias, version=version)
            if first is None:
                first = layer
            else:
                layer.P = first.P
                if hasattr(first, "SIG") and first.SIG is not None:
                    layer.SIG = first.SIG
            setattr(parent, attr, layer)


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


def save_state_dict(state_dict, path, container: str | None = None, **extra) -> str:
    """torch.save a state dict the way published checkpoints are saved (optionally inside {container: sd})."""
    obj = dict(state_dict) if container is None else {container: state_dict, **extra}
    torch.save(obj, path)
    return str(path)


def forward_with_activations(model: torch.nn.Module, x: torch.Tensor, modules: dict[str, str]):
    """model(x) and the outputs of the named submodules ({our layer name: torch module path}), NHWC numpy."""
    acts, hooks = {}, []
    for name, path in modules.items():
        def hook(module, args, out, name=name):
            acts[name] = to_nhwc(out)
        hooks.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, acts


def run_cut_points(model, x, layers):
    """One jitted call: logits, the default forward_features, and per layer its activations and the logits
    forward_head computes from them."""
    import jax
    from flax import nnx
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, x):
        m = nnx.merge(graphdef, state)
        feats = {layer: m.forward_features(x, layer) for layer in layers}
        return m(x), m.forward_features(x), feats, {layer: m.forward_head(feats[layer], layer) for layer in layers}

    return jax.device_get(f(state, x))


def check_cut_points(model, ref, x, torch_layers: dict[str, str], target: str, tol: float = 1e-4):
    """The model against its PyTorch reference `ref` on NHWC `x`: logits, the activations at every layer name
    (torch_layers maps ours to the reference's module paths; atol scaled by their magnitude), forward_head from
    each of them, and the default forward_features == the activations at `target`."""
    import jax.numpy as jnp
    logits_ref, acts_ref = forward_with_activations(ref, torch.from_numpy(x).permute(0, 3, 1, 2), torch_layers)
    logits, default, feats, heads = run_cut_points(model, jnp.asarray(x), tuple(torch_layers))
    np.testing.assert_allclose(logits, logits_ref, rtol=0, atol=tol)
    np.testing.assert_array_equal(default, feats[target])
    for layer in torch_layers:
        scale = np.abs(acts_ref[layer]).max()
        np.testing.assert_allclose(feats[layer], acts_ref[layer], rtol=0, atol=tol * max(1.0, scale), err_msg=layer)
        np.testing.assert_allclose(heads[layer], logits_ref, rtol=0, atol=tol, err_msg=layer)


def initial_values(name: str, keys: tuple[str, ...], **overrides) -> dict[str, np.ndarray]:
    """Some parameters of create_model(name), initialised in one jitted call that computes only those."""
    import jax
    from flax import nnx

    from models.registry import create_model

    def init():
        flat = nnx.to_flat_state(nnx.state(create_model(name, **overrides)))
        return {k: v.get_value() for p, v in flat if (k := ".".join(map(str, p))) in keys}
    return jax.device_get(jax.jit(init)())


def random_images(size: int, seed: int = 0):
    return np.random.default_rng(seed).standard_normal((2, size, size, 3), dtype=np.float32)


def torch_activation_and_grad(model, module, x, labels):
    """The activations A of `module` (a forward hook) and dS/dA by autograd, S = sum of the logits at `labels`:
    the study's Grad-CAM inputs in PyTorch (NCHW)."""
    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = store["a"]
    score = (logits * torch.nn.functional.one_hot(labels, logits.shape[1])).sum()
    (g,) = torch.autograd.grad(score, a)
    return a.detach(), g
