"""Test-wide set-up: exact fp32 matmuls/convs, a persistent XLA compilation cache, the repo on sys.path."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Every compiled program is kept, however quick its compile (most of the suite's are well under JAX's default
# of 1 s); through the environment, so are those of the subprocesses that tests start (the command lines, the
# AVX2 build). No size limit: JAX's eviction needs an access-time file beside every entry, which entries written
# without a limit lack, and it then fails every write.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


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
