"""PyTorch checkpoints -> Flax NNX models, and orbax save/restore of converted models: one import for the
three parts, each in its own module.

    sd = read_checkpoint("convnext_dcls_tiny_1k_224_ema.pth")      # models.torchfile: no torch, no pickled code
    model = from_state_dict("convnext_tiny_dcls", sd)                # models.statedict: timm or original key names
    model = load("convnext_tiny_dcls", "ckpt.pth")                   # both steps; also an orbax dir
    save(model, "out/convnext_tiny_dcls"); model = restore("out/convnext_tiny_dcls")   # models.checkpoints

    python -m models.convert --model convnext_tiny_dcls --checkpoint FILE [--key model] --out DIR

Downloads (URLs, the published checkpoints, the converted cache) are the evaluation layer's: evaluation.checkpoints
(`load`, `load_published`, and the same command line accepting URLs: `python -m evaluation.checkpoints ...`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models import registry
from models.checkpoints import CorruptCheckpointError, Fetch, load, restore, save, verify  # noqa: F401
from models.statedict import _key, check_finite, from_state_dict, merge_state_dict  # noqa: F401
from models.torchfile import (CONTAINER_KEYS, MAX_EXPANDED_BYTES, MAX_LISTED, MAX_PICKLE_BYTES,  # noqa: F401
                              MAX_PICKLE_OPS, MAX_RATIO, read_checkpoint)

__all__ = ["CONTAINER_KEYS", "CorruptCheckpointError", "check_finite", "from_state_dict", "load", "main",
           "merge_state_dict", "read_checkpoint", "restore", "save", "verify"]

# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None, *, fetch: Fetch | None = None, prog: str = "python -m models.convert") -> int:
    """The converter's command line; URLs need `fetch` (evaluation.checkpoints.main passes the download cache's)."""
    parser = argparse.ArgumentParser(prog=prog, description="Convert a PyTorch checkpoint into an orbax checkpoint.")
    parser.add_argument("--model", required=True, help="registry name, e.g. convnext_tiny_dcls")
    parser.add_argument("--checkpoint", required=True, help=".pth/.pth.tar/.safetensors file" + (
        " or URL" if fetch else " (a URL: python -m evaluation.checkpoints)"))
    parser.add_argument("--key", default=None,
                        help=f"container key (default: the first of {', '.join(CONTAINER_KEYS)})")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="convert even if weights hold NaN or infinite values (an error by default)")
    args = parser.parse_args(argv)
    if args.model not in registry.list_models():
        parser.error(f"unknown model {args.model!r}; valid names: {', '.join(registry.list_models())}")
    if Path(args.out).exists() and not args.force:
        parser.error(f"{args.out} already exists (pass --force to replace it)")
    try:
        if fetch is None and args.checkpoint.startswith(("http://", "https://")):
            raise ValueError(f"{args.checkpoint} is a URL: download it first, or convert with "
                             "`python -m evaluation.checkpoints` (same flags), which downloads into the cache")
        model = load(args.model, args.checkpoint, args.key, allow_nonfinite=args.allow_nonfinite, fetch=fetch)
        out = save(model, args.out, args.model, overwrite=args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
