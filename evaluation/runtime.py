"""What the command-line programs share: progress bars, atomic writes, multi-host initialisation, the
process's malloc settings.

    parser = argparse.ArgumentParser(); runtime.add_distributed_flags(parser)
    args = parser.parse_args(); runtime.check_distributed_flags(args)   # ValueError on a bad flag
    runtime.init_distributed(args)          # jax.distributed.initialize() when asked or when a cluster is seen
    with runtime.Progress(total=1000, unit="img") as bar: bar.update(8)
    runtime.write_atomic("out.json", text)
    runtime.keep_freed_memory()             # first thing in a program (evaluate.py and train.py do)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from data.download import write_atomic  # noqa: F401  (the one atomic write, re-exported)


class Progress:
    """tqdm on stderr: a live bar on a terminal; in a log (stderr not a terminal) a plain line every
    `log_every` seconds and at the end, never carriage returns. Disabled when `enabled` is false or `total` is 0."""

    def __init__(self, total: int, enabled: bool = True, desc: str | None = None, unit: str = "img",
                 log_every: float = 30.0, file=None, initial: int = 0):
        from tqdm.auto import tqdm
        file = file or sys.stderr
        self.enabled = enabled and total > 0
        tty = hasattr(file, "isatty") and file.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file if tty else _Lines(file),
                        disable=not self.enabled, mininterval=0.1 if tty else log_every,
                        maxinterval=10 if tty else log_every, dynamic_ncols=tty, ascii=not tty,
                        ncols=None if tty else 100)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def write(self, line: str) -> None:
        """Prints a line on stdout without breaking the bar."""
        if self.enabled:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Lines:
    """A file for tqdm that turns each redraw into one plain line (for logs)."""

    def __init__(self, file):
        self.file, self.last = file, None

    def write(self, s: str):
        s = s.replace("\r", "").replace("\x1b[A", "").strip()
        if s and s != self.last:
            self.file.write(s + "\n")
            self.last = s

    def flush(self):
        self.file.flush()


# ------------------------------------------------------------------------------------------------------------
# Multi-host


def add_distributed_flags(parser) -> None:
    """--coordinator HOST:PORT, --num-processes N, --process-id I (the same spelling in every program)."""
    g = parser.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0 for jax.distributed.initialize (with --num-processes and "
                        "--process-id); without it a detected cluster (TPU pod, SLURM, Open MPI, "
                        "JAX_COORDINATOR_ADDRESS) is initialised from its environment")
    g.add_argument("--num-processes", "--num_processes", dest="num_processes", type=int, metavar="N",
                   help="number of processes (hosts)")
    g.add_argument("--process-id", "--process_id", dest="process_id", type=int, metavar="I",
                   help="this process's index in [0, --num-processes)")


def check_distributed_flags(args) -> None:
    """ValueError for flags that cannot work, before anything is initialised."""
    n, i, c = args.num_processes, args.process_id, args.coordinator
    if n is not None and n < 1:
        raise ValueError(f"--num-processes must be >= 1, got {n}")
    if i is not None and not 0 <= i < (n or 1 << 30):
        raise ValueError(f"--process-id must be in [0, {n}), got {i}")
    if c is not None:
        host, sep, port = c.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator {c!r} is not HOST:PORT")
        if n is None or i is None:
            raise ValueError("--coordinator needs --num-processes and --process-id")


def cluster_detected(env=os.environ) -> bool:
    """Whether jax.distributed.initialize() can configure itself from the environment."""
    return ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def init_distributed(args, force: bool = False) -> bool:
    """jax.distributed.initialize() when a flag asks for it, a cluster is detected or `force`; what the flags
    leave out comes from the environment. Returns whether it ran. CPU processes exchange collectives over gloo."""
    import jax
    flags = (args.coordinator, args.num_processes, args.process_id)
    if not (force or cluster_detected() or any(v is not None for v in flags)):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(*flags)
    return True


# ------------------------------------------------------------------------------------------------------------
# Memory


def keep_freed_memory() -> bool:
    """Keeps the memory the process frees for its next allocations (glibc's malloc; elsewhere nothing, False).

    XLA:CPU allocates a computation's outputs and temporaries at every call, from the calling thread. glibc
    serves those threads from arenas whose heaps it unmaps as soon as they shrink, and maps blocks above 32 MiB
    afresh each time, so every call page-faults its activations in again: ~23,000 faults per ConvNeXt-T
    forward at batch 8, a twentieth of its time on a 2-core CPU (BENCHMARKS.md). One arena, and blocks kept
    up to 1 GiB (mallopt M_ARENA_MAX 1, M_MMAP_THRESHOLD and M_TRIM_THRESHOLD 1 GiB) stop that; the process
    keeps its peak memory. It acts on threads that have not allocated yet: call it first. It changes the whole
    process, so the library never calls it; evaluate.py and train.py do, run as programs."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return all(libc.mallopt(option, value) == 1
                   for option, value in ((-8, 1), (-3, 1 << 30), (-1, 1 << 30)))
    except (OSError, AttributeError, TypeError):
        return False
