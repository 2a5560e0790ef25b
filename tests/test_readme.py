"""The README's "Using the pieces" code blocks run as written.

Each ```python block of that section is executed in a fresh namespace, in a folder holding the checkpoint file
the snippet names (random weights in the published checkpoint's layout, written with torch.save), with what a
reader brings of their own: `my_model` (an NNX CNN with a list `blocks`), `vit` (a ViT with 12 blocks and a class
token), `images` and `labels`. Then the values the snippets promise are checked."""
from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from tests.test_cam_any import Block, ViTBlock
from tests.test_registry_sweep import _all_paths

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks(text: str, heading: str) -> list[str]:
    """The ```python blocks between `heading` and the next heading of the same level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    nxt = re.search(rf"^{level} ", text[start + len(heading):], re.M)
    body = text[start:start + len(heading) + (nxt.start() if nxt else len(text))]
    return re.findall(r"^```python\n(.*?)^```", body, re.M | re.S)


BLOCKS = section_blocks(README.read_text(), "## Using the pieces")


class UserCNN(nnx.Module):
    def __init__(self, num_classes=5, *, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.blocks = nnx.List([Block(8, 8, 1, rngs=rngs), Block(8, 12, 2, rngs=rngs), Block(12, 12, 1, rngs=rngs),
                                Block(12, 16, 2, rngs=rngs)])
        self.fc = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(axis=(1, 2)))


class UserViT(nnx.Module):
    def __init__(self, dim=16, patch=4, depth=12, num_classes=5, *, rngs):
        self.patch_embed = nnx.Conv(3, dim, (patch, patch), strides=patch, padding="VALID", rngs=rngs)
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim)))
        self.blocks = nnx.List([ViTBlock(dim, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x):
        t = self.patch_embed(x)
        t = t.reshape(t.shape[0], -1, t.shape[-1])
        t = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (t.shape[0], 1, t.shape[-1])), t], axis=1)
        for block in self.blocks:
            t = block(t)
        return self.head(self.norm(t)[:, 0])


def torch_checkpoint(name: str, path: Path) -> None:
    """A random-weight model's parameters saved as PyTorch saves a state dict (shared DCLS positions repeated
    under every layer that uses them)."""
    import torch
    sd = {key: torch.from_numpy(np.array(var.get_value())) for key, var in _all_paths(models.create_model(name))}
    torch.save(sd, path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    for name, file in re.findall(r'convert\.load\("(\w+)", "([\w.-]+\.pth)"\)', "\n".join(BLOCKS)):
        torch_checkpoint(name, folder / file)
    return folder


def test_the_section_has_code():
    assert len(BLOCKS) >= 2 and all(b.strip() for b in BLOCKS)


def test_readme_blocks_run(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    rng = np.random.default_rng(0)
    user = {"my_model": UserCNN(rngs=nnx.Rngs(0)), "vit": UserViT(rngs=nnx.Rngs(1)),
            "images": jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32), "labels": np.array([1, 3])}
    spaces = []
    for block in BLOCKS:
        names = dict(user) if re.search(r"\b(my_model|vit)\b", block) else {}
        with jax.default_matmul_precision("highest"):
            exec(compile(block, f"README.md:{block.splitlines()[0]}", "exec"), names)
        spaces.append(names)
    first, second = spaces[0], spaces[1]
    assert first["y"].shape == (2, 56, 56, 96)
    assert first["maps"].shape == (first["images"].shape[0], 224, 224)
    assert np.isfinite(np.asarray(first["maps"])).all()
    assert second["maps"].shape == (2, 32, 32) and np.isfinite(np.asarray(second["maps"])).all()
    assert {"deletion_auc", "insertion_auc"} <= set(second["scores"])
