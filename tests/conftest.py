"""Test-wide set-up: exact fp32 matmuls/convs, a persistent XLA compilation cache, the repo on sys.path."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class _TorchvisionBesideCpuTorch:
    """PyPI's torchvision links its C++ operators (nms, roi_align...) to torch's CUDA libraries, so beside the CPU
    build of torch (which scripts/setup.sh installs where the machine has one) they cannot load, and
    `import torchvision` stops at registering a fake kernel for `torchvision::nms` ("operator torchvision::nms
    does not exist"). The tests use torchvision's transforms only (Python over torch's own operators): on the
    first import of torchvision, where its operators cannot load, declare the two schemas it registers
    unconditionally, with no kernel, so the import goes through; calling `torchvision.ops.nms` still fails."""

    library = None

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import glob
        import importlib.util

        spec = importlib.util.find_spec("torchvision")
        if spec is None or spec.origin is None:
            return None
        import torch

        if torch.version.cuda is None:
            try:
                for lib in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C.*")):
                    torch.ops.load_library(lib)
            except OSError:
                type(self).library = torch.library.Library("torchvision", "DEF")
                for op in ("nms", "qnms"):
                    self.library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None                                    # the regular import goes on


sys.meta_path.insert(0, _TorchvisionBesideCpuTorch())
