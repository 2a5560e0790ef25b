"""FastViT SA24/SA36 and their DCLS twins against timm 1.0.31 (DCLS: + dcls 0.1.1) with random weights.

Each reference goes through torch.save -> models.convert.read_checkpoint -> from_state_dict, in timm's and in
apple/ml-fastvit's key layout (timm's own `checkpoint_filter_fn` checks our inverse of it), in the train-time and
in the reparameterised form. The full-size models run through `stand_in`: FastVit's own composition code with
every block a cached jitted call, so the 24 and 36 blocks of SA24/SA36 cost the compiles of a few distinct ones.
"""
from __future__ import annotations

import copy
import functools
import tempfile
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from DCLS.construct.modules import Dcls2d
from flax import nnx
from timm.models import reparameterize_model
from timm.models.fastvit import RepConditionalPosEnc, checkpoint_filter_fn

from models import fastvit
from models.convert import from_state_dict, read_checkpoint
from models.layers import Sequential
from models.registry import create_model, get_entry
from tests.torch_ref import (dclsify, forward_with_activations, randomize_batchnorm, randomize_params,
                             save_state_dict, to_nhwc)

NAMES = ("fastvit_sa24", "fastvit_sa24_dcls", "fastvit_sa36", "fastvit_sa36_dcls")
SMALL = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 64), num_classes=10)
LAYERS = ("stem", "stages.0", "stages.1", "stages.2", "stages.3", "final_conv")
TOL = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# References

def reference(name: str, seed: int = 0, kernel_count: int = 34, **overrides) -> torch.nn.Module:
    """timm's FastViT in eval mode (DCLS: the 7x7 depthwise convs of every ConvMlp and RepCPE -> dcls.Dcls2d v1,
    positions shared per stage), with random BN statistics, layer scales, biases and positions (timm's init
    leaves them trivial) and a larger classifier (logits of order 1)."""
    torch.manual_seed(seed)
    model = timm.create_model(name.removesuffix("_dcls"), **overrides)
    if name.endswith("_dcls"):
        dclsify([[(stage.pos_emb, "pos_enc")] * isinstance(stage.pos_emb, RepConditionalPosEnc)
                 + [(block.mlp.conv, "conv") for block in stage.blocks] for stage in model.stages],
                kernel_count=kernel_count, dilated_kernel_size=17, version="v1", seed=seed)
        randomize_params(model, ("P",), seed=seed + 1, scale=4.0)   # spread over the whole 17 x 17 grid
    randomize_params(model, ("bias",), seed=seed + 2, scale=0.1)
    randomize_params(model, ("gamma",), seed=seed + 3, scale=0.5)
    randomize_batchnorm(model, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".P"):
                p.clamp_(-8, 8)
        model.head.fc.weight.mul_(20)
    return model.eval()


def reparameterized(model: torch.nn.Module) -> torch.nn.Module:
    """timm's reparameterize_model. A DCLS RepCPE is first swapped for timm's RepCPE with a dense 17x17 conv
    holding the DCLS kernel (dcls's own ConstructKernel2d): timm cannot reparameterise the DCLS one itself."""
    model = copy.deepcopy(model)
    for stage in model.stages:
        pe = stage.pos_emb
        if isinstance(pe, RepConditionalPosEnc) and isinstance(pe.pos_enc, Dcls2d):
            dense = RepConditionalPosEnc(pe.dim, spatial_shape=pe.pos_enc.dilated_kernel_size)
            with torch.no_grad():
                dense.pos_enc.weight.copy_(pe.pos_enc.DCK(pe.pos_enc.weight, pe.pos_enc.P, pe.pos_enc.SIG))
                dense.pos_enc.bias.copy_(pe.pos_enc.bias)
            stage.pos_emb = dense
    return reparameterize_model(model).eval()


def to_original(sd):
    """timm names -> apple/ml-fastvit names (the inverse of timm's checkpoint_filter_fn, written here), including
    apple's reparameterised names (`lkb_reparam`, RepCPE `network.N.reparam_conv`)."""
    # apple's flat `network` list: stage blocks, then the next stage's PatchEmbed, then its RepCPE
    stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.")})
    net, index = {}, 0
    for i in stages:
        for part in ("downsample", "pos_emb", "blocks"):
            if any(k.startswith(f"stages.{i}.{part}.") for k in sd):
                net[i, part], index = index, index + 1
    renames = (("stem.", "patch_embed."), ("conv_kxk", "rbr_conv"), ("conv_scale", "rbr_scale"),
               ("identity", "rbr_skip"), ("final_conv", "conv_exp"), ("large_conv", "lkb_origin"),
               (".mlp.", ".convffn."), ("se.fc1", "se.reduce"), ("se.fc2", "se.expand"), ("head.fc.", "head."))
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "stages":
            i, part = int(parts[1]), parts[2]
            rest = parts[4:] if part == "blocks" else parts[3:]
            if part == "pos_emb":
                rest = ["pe" if rest[0] == "pos_enc" else rest[0]] + rest[1:]
            if part == "downsample" and rest[2] == "reparam_conv":
                rest[2] = "lkb_reparam"
            k = ".".join([f"network.{net[i, part]}"] + parts[3:4] * (part == "blocks") + rest)
        for a, b in renames:
            k = k.replace(a, b)
        k = k.replace("layer_scale.gamma", "layer_scale").replace("layer_scale_1.gamma", "layer_scale_1")
        out[k.replace("layer_scale_2.gamma", "layer_scale_2")] = v
    return out


def convert(name: str, state_dict, path, **overrides):
    """The state dict saved as the published checkpoints are (inside "state_dict_ema"), read back, converted."""
    key = get_entry(name).checkpoint.key
    save_state_dict(state_dict, path, container=key)
    return from_state_dict(name, read_checkpoint(path, key), **overrides)


def numpy_state(sd):
    return {k: v.numpy() for k, v in sd.items()}


def inputs(batch: int = 1, size: int = 64, seed: int = 0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)


def torch_run(model, x):
    """Logits and final_conv's output (timm's forward_features), NHWC, in one pass."""
    logits, acts = forward_with_activations(model, torch.from_numpy(x).permute(0, 3, 1, 2),
                                            {"final_conv": "final_conv"})
    return logits, acts["final_conv"]


# ---------------------------------------------------------------------------------------------------------------
# Running the full-size models part by part

@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(graphdef, state, x, pre_logits):
    module = nnx.merge(graphdef, state)
    return module(x) if pre_logits is None else module(x, pre_logits=pre_logits)


def _jitted(module):
    """`module(x[, pre_logits=])` as a jitted call, compiled once per distinct structure and input shape."""
    if not isinstance(module, nnx.Module):
        return module                               # the identity standing for an absent part
    graphdef, state = nnx.split(module)
    return lambda x, pre_logits=None: _apply(graphdef, state, x, pre_logits)


def stand_in(model: fastvit.FastVit) -> SimpleNamespace:
    """An object on which FastVit's, FastVitStage's and Sequential's own methods (`__call__`, `forward_features`,
    `forward_head`, ...) run as written, with every block, stem block, downsampler, RepCPE, final_conv and head
    a cached jitted call."""
    def sequential(modules):
        return functools.partial(Sequential.__call__, [_jitted(m) for m in modules])

    def stage(s):
        parts = SimpleNamespace(downsample=_jitted(s.downsample), pos_emb=_jitted(s.pos_emb),
                                blocks=sequential(s.blocks))
        return functools.partial(fastvit.FastVitStage.__call__, parts)

    m = SimpleNamespace(stem=sequential(model.stem), stages=[stage(s) for s in model.stages],
                        final_conv=_jitted(model.final_conv), head=_jitted(model.head),
                        layer_names=model.layer_names, target_layer=model.target_layer)
    for method in ("_parts", "_index", "forward_features", "forward_head", "__call__"):
        setattr(m, method, functools.partial(getattr(fastvit.FastVit, method), m))
    return m


def run(model: fastvit.FastVit, x):
    """(logits, forward_features(x)) of the model."""
    m = stand_in(model)
    feats = m.forward_features(jnp.asarray(x))
    return np.asarray(m.forward_head(feats)), np.asarray(feats)


def assert_close(actual, desired, what: str, tol: float = TOL):
    """Max abs difference <= tol, relative to the values' scale where that exceeds 1."""
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=0, atol=tol * scale, err_msg=what)


def assert_same_state(a: nnx.Module, b: nnx.Module, atol: float = 0.0):
    fa = nnx.to_flat_state(nnx.state(a, (nnx.Param, nnx.BatchStat)))
    fb = nnx.to_flat_state(nnx.state(b, (nnx.Param, nnx.BatchStat)))
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, va), (_, vb) in zip(fa, fb):
        np.testing.assert_allclose(va.get_value(), vb.get_value(), rtol=0, atol=atol, err_msg=str(path))


@functools.cache
def case(name: str):
    """The reference, its outputs on inputs(), and the converted model (shared by the tests of one name)."""
    ref = reference(name)
    x = inputs()
    with tempfile.TemporaryDirectory() as tmp:
        model = convert(name, ref.state_dict(), f"{tmp}/model.pth.tar")
    return ref, x, torch_run(ref, x), model


# ---------------------------------------------------------------------------------------------------------------
# Tests

@pytest.mark.parametrize("name", NAMES)
def test_full_model_matches_timm(name):
    """The registry's architecture: logits and the CAM target (final_conv, the original `conv_exp`)."""
    ref, x, (logits_ref, feats_ref), model = case(name)
    entry = get_entry(name)
    assert (entry.target_layer, entry.resize_size, entry.input_size) == ("final_conv", 256, 256)
    logits, feats = run(model, x)
    assert feats.shape == (1, 2, 2, 1024)
    assert_close(feats, feats_ref, "final_conv")
    np.testing.assert_allclose(logits, logits_ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ["fastvit_sa24", "fastvit_sa24_dcls"])
def test_reparameterize_matches_timm(name):
    """reparameterize(model) == timm's reparameterize_model, in parameters and outputs, == the train-time form."""
    ref, x, (logits_ref, _), model = case(name)
    if name.endswith("_dcls"):
        with pytest.raises(RuntimeError):  # timm's RepCPE.reparameterize adds a 7x7 identity to the DCLS weight
            reparameterize_model(ref)
    ref_rep = reparameterized(ref)
    rep_logits_ref, rep_feats_ref = torch_run(ref_rep, x)
    rep = fastvit.reparameterize(model)
    assert not model.config.inference_mode and rep.config.inference_mode   # the argument is left as it was
    ref_sd = ref_rep.state_dict()
    flat = nnx.to_flat_state(nnx.state(rep, (nnx.Param, nnx.BatchStat)))
    assert {".".join(map(str, p)) for p, _ in flat} | {k for k in ref_sd if k.endswith((".P", "num_batches_tracked"))} \
        == set(ref_sd)   # P: one leaf per stage in ours, repeated per layer in timm's
    for path, var in flat:
        key = ".".join(map(str, path))
        np.testing.assert_allclose(var.get_value(), ref_sd[key].numpy(), rtol=0, atol=1e-5, err_msg=key)
    logits, feats = run(rep, x)
    assert_close(feats, rep_feats_ref, "final_conv")
    np.testing.assert_allclose(logits, rep_logits_ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(logits, logits_ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(logits, run(model, x)[0], rtol=0, atol=TOL)


def test_layers_and_composition_match_timm():
    """forward_features at every layer against timm's activations there, forward_head from each back to the
    logits, __call__, pre_logits."""
    ref, x, (logits_ref, _), model = case("fastvit_sa24")
    assert model.layer_names == LAYERS
    _, acts = forward_with_activations(ref, torch.from_numpy(x).permute(0, 3, 1, 2), {l: l for l in LAYERS})
    m = stand_in(model)
    np.testing.assert_allclose(m.__call__(x), logits_ref, rtol=0, atol=TOL)
    for layer in LAYERS:
        a = m.forward_features(x, layer)
        assert_close(a, acts[layer], layer)
        np.testing.assert_allclose(m.forward_head(a, layer), logits_ref, rtol=0, atol=TOL, err_msg=layer)
    assert_close(m.forward_head(acts["final_conv"], pre_logits=True), acts["final_conv"].mean((1, 2)), "pooled")


@pytest.mark.parametrize("name", NAMES)
def test_original_layout_maps_to_timm(name):
    """remap_keys turns apple's names into timm's, as timm's own checkpoint_filter_fn does (on which our inverse,
    to_original, must round-trip), and leaves timm's names alone."""
    ref = case(name)[0]
    sd = ref.state_dict()
    original = to_original(sd)
    assert {"patch_embed.0.rbr_conv.0.conv.weight", "conv_exp.se.reduce.weight", "head.weight", "network.6.pe.weight",
            "network.7.0.layer_scale_1", "network.0.0.token_mixer.layer_scale", "network.0.0.layer_scale",
            "network.5.proj.0.lkb_origin.conv.weight", "network.0.0.convffn.conv.bn.running_var"} <= original.keys()
    if name.endswith("_dcls"):
        assert {"network.6.pe.P", "network.0.0.convffn.conv.conv.P"} <= original.keys()
    for renamed in (checkpoint_filter_fn(original, ref), fastvit.remap_keys(original), fastvit.remap_keys(sd)):
        assert renamed.keys() == sd.keys() and all(renamed[k] is sd[k] for k in sd)


@pytest.mark.parametrize("name", ["fastvit_sa24", "fastvit_sa24_dcls"])
def test_original_layout_converts_to_the_same_model(name, tmp_path):
    ref = reference(name, **SMALL)
    assert_same_state(convert(name, to_original(ref.state_dict()), tmp_path / "original.pth.tar", **SMALL),
                      convert(name, ref.state_dict(), tmp_path / "timm.pth.tar", **SMALL))


@pytest.mark.parametrize("name", ["fastvit_sa24", "fastvit_sa24_dcls"])
def test_reparameterized_checkpoints_load(name, tmp_path):
    """timm's reparameterised state dict loads (inference_mode inferred from its keys) into reparameterize()'s
    model; so does it in apple's reparameterised names (`lkb_reparam`, RepCPE `network.N.reparam_conv`), which
    timm's filter does not know."""
    ref = reference(name, **SMALL)
    rep_sd = reparameterized(ref).state_dict()
    loaded = convert(name, rep_sd, tmp_path / "timm.pth.tar", **SMALL)
    assert loaded.config.inference_mode
    assert_same_state(loaded, fastvit.reparameterize(convert(name, ref.state_dict(), tmp_path / "t.pth", **SMALL)),
                      atol=1e-5)
    rep_original = to_original(rep_sd)
    assert {"network.1.proj.0.lkb_reparam.weight", "network.6.reparam_conv.weight", "conv_exp.reparam_conv.weight",
            "network.2.0.token_mixer.reparam_conv.weight"} <= rep_original.keys()
    assert fastvit.remap_keys(rep_original).keys() == rep_sd.keys()
    assert fastvit.remap_keys(rep_sd).keys() == rep_sd.keys()
    assert_same_state(convert(name, rep_original, tmp_path / "original.pth.tar", **SMALL), loaded)


def test_dcls_positions_are_shared_per_stage():
    """One P per stage, owned by its first DCLS layer (stage 3: RepCPE's), as the study's replace_depthwise_dcls."""
    model = case("fastvit_sa24_dcls")[3]
    owners = []
    for stage in model.stages:
        convs = [block.mlp.conv.conv for block in stage.blocks]
        if isinstance(stage.pos_emb, fastvit.RepConditionalPosEnc):
            convs.insert(0, stage.pos_emb.pos_enc)
        assert all(c.P is convs[0].P for c in convs)
        assert (convs[0].kernel_count, convs[0].dilated_kernel_size, convs[0].version) == (34, (17, 17), "v1")
        owners.append(convs[0].P)
    assert len({id(p) for p in owners}) == 4
    assert model.stages[3].pos_emb.pos_enc.bias is not None and model.stages[0].blocks[0].mlp.conv.conv.bias is None


def test_mismatched_checkpoints_name_the_keys(tmp_path):
    dense = numpy_state(reference("fastvit_sa24", **SMALL).state_dict())
    with pytest.raises(ValueError, match=r"(?s)missing.*stages\.0\.blocks\.0\.mlp\.conv\.conv\.P.*"
                                         r"stages\.0\.blocks\.0\.mlp\.conv\.conv\.weight: checkpoint \(16, 1, 7, 7\)"):
        from_state_dict("fastvit_sa24_dcls", dense, **SMALL)           # plain weights into the DCLS model
    deeper = numpy_state(reference("fastvit_sa24", **{**SMALL, "layers": (2, 1, 1, 1)}).state_dict())
    with pytest.raises(ValueError, match=r"unexpected.*\n \+ stages\.0\.blocks\.1\."):
        from_state_dict("fastvit_sa24", deeper, **SMALL)                 # a deeper model's checkpoint
    with pytest.raises(ValueError, match=r"missing.*\n - head\.fc\.bias"):
        from_state_dict("fastvit_sa24", {k: v for k, v in dense.items() if k != "head.fc.bias"}, **SMALL)
    wrong = reference("fastvit_sa24_dcls", kernel_count=26, **SMALL)
    with pytest.raises(ValueError, match=r"stages\.0\.blocks\.0\.mlp\.conv\.conv\.weight: checkpoint \(16, 1, 26\) "
                                         r"vs model \(16, 1, 34\)"):
        convert("fastvit_sa24_dcls", wrong.state_dict(), tmp_path / "wrong.pth.tar", **SMALL)


@pytest.mark.parametrize("stage", [0, 3])
def test_train_mode_matches_timm(stage):
    """Train mode, on a RepMixer stage and on the attention stage (PatchEmbed, RepCPE, attention block): batch
    statistics in every BatchNorm, running averages updated as PyTorch does."""
    ref = reference("fastvit_sa24", **SMALL)
    model = from_state_dict("fastvit_sa24", numpy_state(ref.state_dict()), **SMALL)
    ref_stage, ours = ref.stages[stage].train(), model.stages[stage]
    size, dim = (16, SMALL["embed_dims"][0]) if stage == 0 else (4, SMALL["embed_dims"][2])   # the stage's input
    x = np.random.default_rng(2).standard_normal((2, size, size, dim), dtype=np.float32)
    with torch.no_grad():
        out_ref = to_nhwc(ref_stage(torch.from_numpy(x).permute(0, 3, 1, 2)))
    ours.train()
    graphdef, state = nnx.split(ours)

    @jax.jit
    def g(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), nnx.state(m, nnx.BatchStat)

    out, stats = g(state, x)
    assert_close(out, out_ref, f"stages.{stage}")
    ref_sd = ref_stage.state_dict()
    for path, var in nnx.to_flat_state(stats):
        key = ".".join(map(str, path))
        assert_close(var.get_value(), ref_sd[key].numpy(), key)


def test_config_rates_and_errors():
    small = dict(layers=(2, 2, 3, 2), embed_dims=(16, 32, 32, 64), num_classes=10)
    abstract = nnx.eval_shape(lambda: create_model("fastvit_sa36", drop_path_rate=0.3, **small))
    ref = timm.create_model("fastvit_sa36", drop_path_rate=0.3, **small)
    for stage, ref_stage in zip(abstract.stages, ref.stages):
        for block, ref_block in zip(stage.blocks, ref_stage.blocks):
            for ours, theirs in (("drop_path", "drop_path"), ("drop_path1", "drop_path1")):
                if hasattr(ref_block, theirs):
                    rate = getattr(getattr(ref_block, theirs), "drop_prob", 0.0)
                    assert getattr(block, ours).rate == pytest.approx(rate)
    gamma = abstract.stages[0].blocks[0].layer_scale.gamma.get_value()
    assert gamma.shape == (16, 1, 1) and get_entry("fastvit_sa36").builder.args[0].layer_scale_init_value == 1e-6
    with pytest.raises(ValueError, match="unknown config override"):
        create_model("fastvit_sa24", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="unknown layer 'conv_exp'"):
        abstract.forward_features(jnp.zeros((1, 64, 64, 3)), "conv_exp")
    with pytest.raises(ValueError, match="collide"):
        fastvit.remap_keys({"network.0.0.layer_scale": np.zeros(1), "stages.0.blocks.0.layer_scale.gamma": np.zeros(1)})
    assert fastvit.infer_overrides({"stem.0.reparam_conv.weight": np.zeros(1)}) == {"inference_mode": True}
    assert fastvit.infer_overrides({"stem.0.conv_kxk.0.conv.weight": np.zeros(1)}) == {}
