"""Writes tests/golden/harmonization.npz from Harmonization's own TensorFlow code (test data, run once).

    HARMONIZATION_SRC=/path/to/serre-lab/Harmonization TF_USE_LEGACY_KERAS=1 python tests/golden/make_harmonization_golden.py

Needs tensorflow (made with tensorflow-cpu 2.21.0 and tf-keras 2.21.0: the reference's loss.py uses
tf.keras.losses.Reduction, which Keras 3 dropped) and a checkout of serre-lab/Harmonization (MIT; v0.0.9, commit
ffe1c49). Only harmonization/training/{loss,pyramid}.py are imported (the package's __init__ pulls in the model
zoo's dependencies, so the package is stubbed). Nothing of the reference is copied here.

Contents (fixture inputs drawn from numpy's default_rng(0), float32):
  maps (3, 50, 50), pyr_<i> its pyramidal_representation(maps[..., None], 5)[i][..., 0], i = 0..5 (odd sizes);
  std_cut: standardize_cut(maps);
  a, b (4, 64, 64), tokens (4,) (one 0): pmse = pyramidal_mse_with_tokens(a, b, tokens);
  harmonizer_loss on its own test model (MaxPooling2D(10) -> Flatten -> Dense(10)), images (4, 64, 64, 3) in
  [0, 255), one-hot labels, human maps (4, 64, 64) with map 3 all zero, tokens (1, 1, 1, 1): the Dense kernel and
  bias before (kernel0, bias0) and the gradients harmonizer_loss returns (grad_kernel, grad_bias), for
  lambda_harmonization 1 (default) and 1000 (grad_*_h1000, the alignment term dominating).
"""
import os
import sys
import types
from pathlib import Path

import numpy as np

src = Path(os.environ.get("HARMONIZATION_SRC", "Harmonization")).resolve()
if not (src / "harmonization" / "training" / "loss.py").is_file():
    sys.exit(f"HARMONIZATION_SRC={src} has no harmonization/training/loss.py")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import tensorflow as tf  # noqa: E402

package = types.ModuleType("harmonization")
package.__path__ = [str(src / "harmonization")]
sys.modules["harmonization"] = package
from harmonization.training.loss import harmonizer_loss, pyramidal_mse_with_tokens, standardize_cut  # noqa: E402
from harmonization.training.pyramid import pyramidal_representation  # noqa: E402


def main(out=Path(__file__).with_name("harmonization.npz")):
    rng = np.random.default_rng(0)
    res = {}
    maps = rng.uniform(0, 1, (3, 50, 50)).astype(np.float32)
    maps[1] = np.square(maps[1])
    res["maps"] = maps
    for i, level in enumerate(pyramidal_representation(tf.constant(maps[..., None]), 5)):
        res[f"pyr_{i}"] = level.numpy()[..., 0]
    res["std_cut"] = standardize_cut(tf.constant(maps)).numpy()
    a = rng.normal(0, 1, (4, 64, 64)).astype(np.float32)
    b = rng.uniform(0, 2, (4, 64, 64)).astype(np.float32)
    tokens = np.array([1, 0, 1, 0.5], np.float32)
    res.update(a=a, b=b, tokens=tokens,
               pmse=pyramidal_mse_with_tokens(tf.constant(a), tf.constant(b), tf.constant(tokens)).numpy())

    images = rng.uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)   # no ties under the max pools
    labels = np.eye(10, dtype=np.float32)[[3, 7, 0, 3]]
    human = rng.uniform(0, 1, (4, 64, 64)).astype(np.float32)
    yy, xx = np.mgrid[:64, :64]
    human[1] = np.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / 200.0)
    human[3] = 0.0
    model = tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(64, 64, 3)),
        tf.keras.layers.MaxPooling2D((10, 10), strides=(10, 10)),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(10, activation="linear"),
    ])
    kernel, bias = model.layers[-1].kernel, model.layers[-1].bias
    kernel.assign(rng.normal(0, 0.05, kernel.shape).astype(np.float32))
    bias.assign(rng.normal(0, 0.1, bias.shape).astype(np.float32))
    res.update(images=images, labels=labels, human=human, kernel0=kernel.numpy(), bias0=bias.numpy())
    ones = tf.ones(4)
    for suffix, lam in (("", 1.0), ("_h1000", 1000.0)):
        gk, gb = harmonizer_loss(model, tf.constant(images), ones, tf.constant(labels), tf.constant(human),
                                 lambda_harmonization=lam)
        res[f"grad_kernel{suffix}"], res[f"grad_bias{suffix}"] = gk.numpy(), gb.numpy()
    np.savez_compressed(out, **res)
    print(f"wrote {out} (tensorflow {tf.__version__})")


if __name__ == "__main__":
    main()
