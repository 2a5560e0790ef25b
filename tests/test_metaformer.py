"""CAFormer-S18 / ConvFormer-S18 (+ DCLS) against timm 1.0.31 (and dcls.Dcls2d) with random weights.

Parity runs use the S18 presets with fewer blocks (PARITY depths: two blocks in the DCLS stages, so shared
positions are exercised) at 64x64 input; the full-size presets are checked by converting full timm state dicts.
Each jitted function is compiled once per model and cached at module level.
"""
import functools
import re

import jax
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from timm.models import metaformer as timm_metaformer

from models import convert
from models.metaformer import remap_keys
from models.registry import create_model
from tests.torch_ref import dclsify, forward_with_activations, randomize_params, save_state_dict

NAMES = ("caformer_s18", "convformer_s18", "caformer_s18_dcls", "convformer_s18_dcls")
PARITY = {"depths": (2, 2, 1, 1)}
KERNEL_COUNT = {"caformer_s18_dcls": 34, "convformer_s18_dcls": 40}
TIMM_PRESETS = {   # as timm's caformer_s18 / convformer_s18 builders
    "caformer_s18": dict(dims=(64, 128, 320, 512),
                         token_mixers=[timm_metaformer.SepConv] * 2 + [timm_metaformer.Attention] * 2,
                         norm_layers=[timm_metaformer.LayerNorm2dNoBias] * 2 + [timm_metaformer.LayerNormNoBias] * 2),
    "convformer_s18": dict(dims=(64, 128, 320, 512), token_mixers=timm_metaformer.SepConv,
                           norm_layers=timm_metaformer.LayerNorm2dNoBias),
}


def timm_model(name: str, kernel_count: int | None = None, seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm's model for `name` (the `_dcls` twins via dclsify: every SepConv depthwise conv, positions shared per
    stage), with random layer/res scales, StarReLU scalars, norm affines, biases and positions over the whole
    17x17 grid, so that no branch hides."""
    torch.manual_seed(seed)
    arch = name.removesuffix("_dcls")
    if "depths" in kwargs:   # timm's registered builders fix the depths: build its class with their arguments
        model = timm_metaformer.MetaFormer(**{**TIMM_PRESETS[arch], **kwargs})
    else:
        model = timm.create_model(arch, **kwargs)
    if name.endswith("_dcls"):
        stages = [[(b.token_mixer, "dwconv") for b in s.blocks if isinstance(b.token_mixer, timm_metaformer.SepConv)]
                  for s in model.stages]
        dclsify(stages, kernel_count=kernel_count or KERNEL_COUNT[name], dilated_kernel_size=17, version="v1",
                bias=False, seed=seed)
    randomize_params(model, ("scale", "bias"), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".P"):
                p.uniform_(-8.0, 8.0, generator=g)
            elif re.search(r"norm\d?\.weight$", pname):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def to_sail(state_dict: dict) -> dict:
    """timm names -> sail-sg MetaFormer names and shapes (the inverse of timm's checkpoint_filter_fn)."""
    rules = ((r"^stem\.conv\.", "downsample_layers.0.conv."), (r"^stem\.norm\.", "downsample_layers.0.post_norm."),
             (r"^stages\.(\d+)\.downsample\.norm\.", r"downsample_layers.\1.pre_norm."),
             (r"^stages\.(\d+)\.downsample\.conv\.", r"downsample_layers.\1.conv."),
             (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
             (r"^head\.norm\.", "norm."), (r"^head\.fc\.", "head."))
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if re.search(r"\.(pwconv[12]|fc[12])\.weight$", key) and value.ndim == 4:
            value = value[:, :, 0, 0]   # sail-sg's pointwise convs and MLPs are Linear layers
        out[key] = value
    return out


@functools.cache
def _jitted(graphdef):
    def run(state, x):
        model = nnx.merge(graphdef, state)
        feats = model.forward_features(x)
        return model.forward_head(feats), feats
    return jax.jit(run)


def run(model, x):
    graphdef, state = nnx.split(model)
    return jax.tree.map(np.asarray, _jitted(graphdef)(state, x))


@functools.cache
def _parity_case(name: str, directory: str):
    """(timm model, our model converted from its torch.save'd state dict) at the PARITY depths."""
    ref = timm_model(name, **PARITY)
    path = save_state_dict(ref.state_dict(), f"{directory}/{name}.pth")
    return ref, convert.from_state_dict(name, convert.read_checkpoint(path), **PARITY)


@pytest.fixture(scope="module")
def parity_case(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("metaformer"))
    return lambda name: _parity_case(name, directory)


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_features_match_timm(name, parity_case):
    ref, model = parity_case(name)
    x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
    ref_logits, acts = forward_with_activations(ref, torch.from_numpy(x).permute(0, 3, 1, 2), {"stages.3": "stages.3"})
    logits, feats = run(model, x)
    assert feats.shape == acts["stages.3"].shape == (2, 2, 2, 512)
    assert np.abs(logits - ref_logits).max() <= 1e-4, np.abs(logits - ref_logits).max()
    scale = max(1.0, np.abs(acts["stages.3"]).max())
    assert np.abs(feats - acts["stages.3"]).max() <= 1e-5 * scale
    assert np.abs(ref_logits).max() > 1.0   # random weights give a non-degenerate check


@pytest.mark.parametrize("name", NAMES)
def test_original_layout_converts_to_same_model(name, parity_case):
    ref, model = parity_case(name)
    sd = ref.state_dict()
    sail = to_sail(sd)
    assert not any(k.startswith(("stem.", "head.fc.")) or ".blocks." in k for k in sail)
    # the inverse is right: timm's own filter maps it back to timm's names and shapes
    back = timm_metaformer.checkpoint_filter_fn(sail, ref)
    assert set(back) == set(sd) and all(back[k].shape == sd[k].shape for k in sd)
    sail = {k: v.detach().numpy() for k, v in sail.items()}
    assert {k: v.shape for k, v in remap_keys(sail).items()} == {k: tuple(v.shape) for k, v in sd.items()}
    other = convert.from_state_dict(name, sail, **PARITY)
    ours, theirs = nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(other, nnx.Param))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (path, a), (_, b) in zip(ours, theirs):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def test_remap_keys_is_identity_on_timm_names():
    sd = numpy_state_dict(timm_model("caformer_s18_dcls", depths=(1, 1, 1, 1)))
    out = remap_keys(sd)
    assert out.keys() == sd.keys() and all(out[k] is sd[k] for k in sd)


@pytest.mark.parametrize("name", NAMES)
def test_full_size_presets_load_timm_state_dicts(name):
    ref = timm_model(name)
    sd = numpy_state_dict(ref)
    model = convert.from_state_dict(name, sd)
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if name.endswith("_dcls"):
        # one position tensor per stage with SepConv blocks, shared by all of that stage's blocks
        positions = sorted(k for k in flat if k.endswith(".P"))
        stages = sorted({k.split(".blocks")[0] for k in sd if k.endswith(".dwconv.P")})
        assert positions == [f"{s}.blocks.0.token_mixer.dwconv.P" for s in stages]
        assert len(stages) == (2 if name.startswith("caformer") else 4)
        assert sum(k.endswith(".P") for k in sd) == (6 if name.startswith("caformer") else 18)
    else:
        assert flat.keys() == sd.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(value, sd[key], err_msg=key)
    assert model.head.fc.fc2.weight.get_value().shape == (1000, 2048)


def test_forward_head_of_forward_features_is_the_model():
    # a tiny CAFormer (SepConv stages and attention stages; the slicing does not depend on the depthwise conv)
    tiny = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), num_classes=10)
    model = convert.from_state_dict("caformer_s18", numpy_state_dict(timm_model("caformer_s18", **tiny)), **tiny)
    graphdef, state = nnx.split(model)

    @jax.jit
    def outputs(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), {layer: m.forward_head(m.forward_features(x, layer), layer) for layer in m.layer_names}

    x = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
    logits, heads = outputs(state, x)
    assert logits.shape == (2, 10) and np.abs(logits).max() > 0
    assert set(heads) == {"stem", "stages.0", "stages.1", "stages.2", "stages.3"} == set(model.layer_names)
    for layer, value in heads.items():
        np.testing.assert_allclose(value, logits, rtol=0, atol=1e-6, err_msg=layer)
    with pytest.raises(ValueError, match="unknown layer 'stages.4'"):
        model.forward_features(x, "stages.4")


def test_drop_path_rates_and_train_mode_match_timm():
    ref = timm_model("caformer_s18", drop_path_rate=0.3, **PARITY)
    model = nnx.eval_shape(lambda: create_model("caformer_s18", drop_path_rate=0.3, **PARITY))
    for i, stage in enumerate(ref.stages):
        for j, block in enumerate(stage.blocks):
            ours = model.stages[i].blocks[j]
            for k in (1, 2):
                theirs = getattr(block, f"drop_path{k}")
                assert getattr(ours, f"drop_path{k}").rate == pytest.approx(getattr(theirs, "drop_prob", 0.0),
                                                                            abs=1e-7)
    model.eval()
    assert model.stages[3].blocks[0].drop_path1.deterministic and model.head.drop.deterministic
    model.train()
    assert not model.stages[3].blocks[0].drop_path1.deterministic and not model.head.drop.deterministic


def test_mismatched_checkpoints_name_the_keys(parity_case):
    caformer = {k: v.detach().numpy() for k, v in parity_case("caformer_s18")[0].state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)missing.*stages\.2\.blocks\.0\.token_mixer\.pwconv1\.weight.*"
                                         r"unexpected.*stages\.2\.blocks\.0\.token_mixer\.qkv\.weight"):
        convert.from_state_dict("convformer_s18", caformer, **PARITY)

    partial = {k: v for k, v in caformer.items() if k != "stages.1.blocks.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match=r"missing.*\n - stages\.1\.blocks\.1\.mlp\.fc2\.weight"):
        convert.from_state_dict("caformer_s18", partial, **PARITY)

    with pytest.raises(ValueError, match=r"unexpected.*\n \+ stages\.0\.blocks\.0\.token_mixer\.dwconv\.P"):
        convert.from_state_dict("caformer_s18", numpy_state_dict(parity_case("caformer_s18_dcls")[0]), **PARITY)

    wrong_count = numpy_state_dict(timm_model("convformer_s18_dcls", kernel_count=34, **PARITY))
    with pytest.raises(ValueError, match=r"stages\.0\.blocks\.0\.token_mixer\.dwconv\.weight: checkpoint "
                                         r"\(128, 1, 34\) vs model \(128, 1, 40\)"):
        convert.from_state_dict("convformer_s18_dcls", wrong_count, **PARITY)


def test_bad_overrides_raise():
    with pytest.raises(ValueError, match="unknown config override"):
        create_model("caformer_s18", depth=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="4 stages"):
        nnx.eval_shape(lambda: create_model("convformer_s18", depths=(1, 1, 1)))
