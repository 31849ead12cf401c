"""Benchmark fixtures: device, dtype, smoke mode, measured ceilings, and a timing helper.

`pytest benchmarks/ --benchmark-only` times every provider; `pytest benchmarks/ --benchmark-disable`
(the smoke mode `make test` runs) runs each benchmark once on small sizes so the suite cannot rot.
Options: --bench-device (cpu/cuda), --bench-dtype (float32/bfloat16/float16).
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from paca_kernels.testing import isolate_inductor_cache

# The tests' TorchInductor cache rule (one folder per source state): see tests/conftest.py.
isolate_inductor_cache(Path(__file__).resolve().parents[1])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.addoption("--bench-dtype", default=None,
                     help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")


@pytest.fixture(scope="session")
def smoke(request: pytest.FixtureRequest) -> bool:
    """True under --benchmark-disable: every benchmark runs once, on small sizes."""
    return bool(request.config.getoption("benchmark_disable", default=False))


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--bench-device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest, device: torch.device) -> torch.dtype:
    name = request.config.getoption("--bench-dtype")
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


@dataclass
class Ceilings:
    """Measured once per run: device-to-device copy bandwidth (bytes read + written per second) and a
    large matmul's rate (FLOP/s) in the benchmark dtype."""

    copy_bytes_per_s: float
    matmul_flops_per_s: float


@pytest.fixture(scope="session")
def ceilings(device: torch.device, dtype: torch.dtype, smoke: bool) -> Ceilings:
    n_copy = (1 << 20) if smoke else (1 << 28 if device.type == "cuda" else 1 << 25)
    src = torch.randn(n_copy, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = _median_seconds(lambda: dst.copy_(src), device, 3 if smoke else 20)
    n = 256 if smoke else (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t_mm = _median_seconds(lambda: a @ b, device, 3 if smoke else 10)
    return Ceilings(2 * src.numel() * src.element_size() / t_copy, 2 * n**3 / t_mm)


@pytest.fixture
def run(benchmark, device: torch.device, dtype: torch.dtype, ceilings: Ceilings, smoke: bool):
    """run(fn, provider=..., flops=..., min_bytes=...): warm up, time with synchronisation, record
    FLOPs, bytes, achieved rates, share of the ceilings and peak memory in extra_info."""

    def _run(fn: Callable[[], object], *, provider: str, flops: int, min_bytes: int) -> None:
        fn()  # warm-up: compilation, allocator, caches
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        once = time.perf_counter() - t0
        # ~15 rounds, fewer for slow rows (a Base train step on a 2-core CPU takes seconds).
        rounds = max(5, min(15, int(3.0 / max(once, 1e-9))))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def timed() -> None:
            fn()
            sync(device)

        if smoke:
            benchmark.pedantic(timed, rounds=1, iterations=1)
        else:
            benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        info = benchmark.extra_info
        info.update(provider=provider, device=str(device), flops=flops, min_bytes=min_bytes,
                    torch=torch.__version__, cuda=torch.version.cuda, triton=_triton_version(),
                    dtype=str(dtype).removeprefix("torch."))
        if device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
            info["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        stats = getattr(benchmark, "stats", None)
        median = getattr(getattr(stats, "stats", None), "median", None) if stats else None
        if median:
            info["tflops"] = flops / median / 1e12
            info["gbps"] = min_bytes / median / 1e9
            info["share_of_copy_bandwidth"] = min_bytes / median / ceilings.copy_bytes_per_s
            info["share_of_matmul_rate"] = flops / median / ceilings.matmul_flops_per_s
        info["ceiling_copy_gbps"] = ceilings.copy_bytes_per_s / 1e9
        info["ceiling_matmul_tflops"] = ceilings.matmul_flops_per_s / 1e12

    return _run


@pytest.fixture
def compile_fn(smoke: bool):
    """torch.compile for the "-compiled" providers. In smoke mode the aot_eager backend: the graph is
    still traced with fullgraph semantics (so the suite cannot rot), without minutes of Inductor
    code generation on a 2-core CI machine."""

    def _compile(fn, mode: str | None = None):
        if smoke:
            return torch.compile(fn, backend="aot_eager")
        return torch.compile(fn, mode=mode) if mode else torch.compile(fn)

    return _compile
