"""`model.dtype: auto` on a CPU: float32 or bfloat16, whichever this machine multiplies faster.

CPUs differ more than their flags say: one with AMX ran bf16 3x faster than fp32, another (AVX-512, no native
bf16 matmul) 4x slower. So the choice is measured, not assumed: a few matmuls of a small model's layer shape in
each dtype, interleaved so that load from other processes hits both alike. The result is kept in
`.cache/cpu-dtype.json`, keyed by CPU and torch version, so every stage of a project runs in the same dtype.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from pathlib import Path

from oel.artifacts import ArtifactError, read_json, write_json

log = logging.getLogger(__name__)
CACHE_FILE = "cpu-dtype.json"
MIN_SPEEDUP = 1.2  # bf16 rounds weights and activations: take it only for a clear gain


def cpu_key() -> str:
    """This CPU (model name and flags) and torch version, hashed."""
    import torch

    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        lines = sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))})
    except OSError:
        lines = [platform.processor(), platform.machine()]
    return hashlib.sha256("\n".join([torch.__version__, *lines]).encode()).hexdigest()[:16]


def measure(reps: int = 6) -> dict[str, float]:
    """Seconds per (256 x 576) @ (576 x 1536) matmul, best of `reps`, fp32 and bf16 taken in turn."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(256, 576, generator=gen), torch.randn(576, 1536, generator=gen)
    pairs = {"float32": (a32, b32), "bfloat16": (a32.bfloat16(), b32.bfloat16())}
    best = {name: float("inf") for name in pairs}
    for turn in range(reps + 1):  # turn 0 warms the kernels up and is not counted
        for name, (a, b) in pairs.items():
            start = time.perf_counter()
            for _ in range(8):
                torch.mm(a, b)
            if turn:
                best[name] = min(best[name], (time.perf_counter() - start) / 8)
    return best


def fastest(cache_dir: Path) -> str:
    """'bfloat16' or 'float32' for this CPU, measured once per CPU and torch version."""
    path = cache_dir / CACHE_FILE
    key = cpu_key()
    try:
        kept = read_json(path)
        if isinstance(kept, dict) and kept.get("key") == key and kept.get("dtype") in ("float32", "bfloat16"):
            return kept["dtype"]
    except (ArtifactError, OSError, ValueError):
        pass  # missing or damaged: a cache, measured again
    times = measure()
    speedup = times["float32"] / times["bfloat16"]
    dtype = "bfloat16" if speedup >= MIN_SPEEDUP else "float32"
    log.info("model.dtype auto on this CPU: %s (bf16 matmul %.2fx the speed of fp32; kept in %s)",
             dtype, speedup, path)
    try:
        write_json(path, {"key": key, "dtype": dtype, "bf16_speedup": round(speedup, 3),
                          "seconds": {name: round(t, 6) for name, t in times.items()}})
    except OSError as err:  # a read-only project still runs; it measures again next time
        log.warning("could not keep the dtype choice in %s: %s", path, err)
    return dtype
