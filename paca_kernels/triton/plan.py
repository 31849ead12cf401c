"""How the Triton launchers plan a launch: tiles, warps, pipeline stages, split-N and grid, as pure
functions of the shapes, the dtype and a :class:`Device` description (no torch, no Triton).

The launchers (:mod:`.cluster_pool`, :mod:`.p2c_attention`) call these functions with the description
of the device they launch on (:func:`cuda_device`, or :data:`INTERPRETER` under ``TRITON_INTERPRET=1``);
the resource gate (``scripts/triton_gate.py``, run by tests/backends/test_triton_resources.py) calls
them with :data:`H100` and compiles every configuration they can return (:func:`configurations`) for
sm_90, holding each to the H100's budgets. The interpreter plans exactly like a GPU with one SM, except
that its dot products run in fp32 with the GPU's roundings emulated (``DOT``, see the kernels).

Grids are one-dimensional: a program id is decoded into (tile, batch·head, split) inside the kernels,
so no launch depends on grid axes 1-2 (at most 65,535); axis 0 holds up to 2^31 − 1 programs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

__all__ = [
    "H100",
    "INTERPRETER",
    "Device",
    "Launch",
    "cluster_pool_bwd_plan",
    "cluster_pool_fwd_plan",
    "configurations",
    "p2c_bwd_plan",
    "p2c_fwd_plan",
]

#: CUDA's limit on grid axis 0 (axes 1 and 2: 65,535, unused here).
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65_535

DTYPES = ("fp16", "bf16", "fp32")
#: rows (b, m) per program of the split-N merge.
MERGE_ROWS = 4


def dtype_name(dtype: object) -> str:
    """"fp16", "bf16" or "fp32" for a torch dtype (by its name: this module does not import torch)."""
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(dtype)]


@dataclass(frozen=True)
class Device:
    """What the planner needs to know about the device a launch runs on."""

    sms: int
    #: shared memory one block may use (bytes), after opting in.
    shared_bytes: int = 227 * 1024
    interpreted: bool = False


#: The target of the resource gate: an H100 SXM (132 SMs, 227 KiB of shared memory per block).
H100 = Device(sms=132)
#: Triton's CPU interpreter: plans like a one-SM GPU (N is split only when asked).
INTERPRETER = Device(sms=1, interpreted=True)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_mode(dtype: str, device: Device, half_mode: str) -> str:
    """The kernels' ``DOT`` constexpr: "ieee" (fp32 products), ``half_mode`` on the GPU for fp16/bf16
    ("tf32" or "native"), and under the interpreter (whose half-precision dot is wrong) "ieee" for fp32
    inputs and "emulate" for fp16/bf16: fp32 products of operands rounded as the GPU rounds them."""
    if dtype == "fp32":
        return "ieee"
    return "emulate" if device.interpreted else half_mode


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel's name, its constexprs, warps, stages and the (1-D) grid."""

    kernel: str
    dtype: str
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    #: launcher-side facts that are not compile options (split count, chunk length, ...).
    extra: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    @property
    def consts(self) -> dict[str, object]:
        return dict(self.constexprs)

    def get(self, name: str) -> int:
        return dict(self.extra)[name]

    def key(self) -> tuple:
        """What makes two launches the same compiled kernel."""
        return (self.kernel, self.dtype, self.constexprs, self.num_warps, self.num_stages)

    def check_grid(self) -> None:
        x, y, z = self.grid
        if not (1 <= x <= MAX_GRID_X and 1 <= y <= MAX_GRID_YZ and 1 <= z <= MAX_GRID_YZ):
            raise ValueError(f"{self.kernel}: grid {self.grid} exceeds CUDA's limits "
                             f"({MAX_GRID_X}, {MAX_GRID_YZ}, {MAX_GRID_YZ})")


# -- cluster_pool -----------------------------------------------------------------------------------

def _cp_block_c(c: int) -> int:
    return max(16, next_power_of_2(c))


def cluster_pool_num_splits(programs: int, n: int, block_k: int, device: Device) -> int:
    """How many programs share one cluster block's N range, to give small batches enough programs."""
    if programs >= device.sms:
        return 1
    # Aim at ~2 waves of programs, but keep >= 4 tiles of N per split so the merge stays cheap.
    return max(1, min(cdiv(2 * device.sms, programs), cdiv(n, 4 * block_k)))


def cluster_pool_fwd_plan(b: int, m: int, n: int, c: int, dtype: str, device: Device,
                          num_splits: int | None = None) -> Launch:
    """The forward's launch (shapes b, m, n, c > 0). ``num_splits`` forces a split count. Whether there
    is a weight, a bias or a split are runtime arguments of the kernels (one compiled kernel for all)."""
    block_c = _cp_block_c(c)
    # The fp32 accumulator BLOCK_M × BLOCK_C stays in registers: fewer clusters per program as C grows.
    block_m = 64 if block_c <= 32 else 32 if block_c <= 256 else 16
    block_m = min(block_m, max(16, next_power_of_2(m)))
    block_k = 64 if block_c <= 128 else 32 if block_c <= 512 else 16
    warps = 4 if block_c <= 128 else 8
    stages = 3 if block_c <= 256 else 2
    m_blocks = cdiv(m, block_m)
    splits = num_splits if num_splits is not None else cluster_pool_num_splits(b * m_blocks, n, block_k, device)
    splits = max(1, min(splits, cdiv(n, block_k)))
    chunk = cdiv(cdiv(n, splits), block_k) * block_k  # a whole number of N tiles per split
    splits = cdiv(n, chunk)
    consts = (("BLOCK_M", block_m), ("BLOCK_K", block_k), ("BLOCK_C", block_c),
              ("DOT", dot_mode(dtype, device, "tf32")))
    return Launch("cluster_pool_fwd", dtype, consts, warps, stages, (m_blocks * splits * b, 1, 1),
                  (("splits", splits), ("chunk", chunk)))


def cluster_pool_merge_plan(b: int, m: int, c: int, splits: int, dtype: str, device: Device) -> Launch:
    """The split-N merge (partial softmaxes → pooled, lse, LayerNorm): MERGE_ROWS cluster rows per program."""
    block_c = _cp_block_c(c)
    consts = (("BLOCK_R", MERGE_ROWS), ("BLOCK_C", block_c))
    return Launch("cluster_pool_merge", dtype, consts, 4 if block_c <= 512 else 8, 1,
                  (cdiv(b * m, MERGE_ROWS), 1, 1))


def cluster_pool_bwd_plan(b: int, m: int, n: int, c: int, dtype: str, device: Device) -> Launch:
    """The backward's launch (shapes b, m, n, c > 0): one program per BLOCK_K patches of one batch element."""
    block_c = _cp_block_c(c)
    # BLOCK_M = 32 spilled from BLOCK_C = 64 on (the dx accumulator and x tile stay in registers), and
    # for fp16/bf16 at BLOCK_C = 32 under Triton 3.6 (8 B of stack at 255 registers since the backward
    # recomputes S from the row max and sum): 16 there.
    block_m = min(32 if block_c <= 32 and dtype == "fp32" else 16, max(16, next_power_of_2(m)))
    block_k = 64 if block_c <= 128 else 32 if block_c <= 512 else 16
    warps = 4 if block_c <= 128 else 8
    stages = 3 if block_c <= 256 else 2
    consts = (("BLOCK_M", block_m), ("BLOCK_K", block_k), ("BLOCK_C", block_c),
              ("DOT", dot_mode(dtype, device, "tf32")))
    return Launch("cluster_pool_bwd", dtype, consts, warps, stages, (cdiv(n, block_k) * b, 1, 1))


# -- p2c_attention ----------------------------------------------------------------------------------

def _p2c_blocks(n: int, m: int, d: int, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps). Every block is a power of two >= 16 (tl.dot's minimum).

    Chosen with the resource gate (no spills under Triton 3.6 and 3.9 for sm_90): the query tile
    shrinks and the warps grow with the on-chip key/value tiles; 256 keys take a head dim of at least
    32 (at 16 every choice spilled) and, in the backward, 16 queries over 8 warps.
    """
    block_m = max(16, next_power_of_2(m))
    block_d = max(16 if block_m < 256 else 32, next_power_of_2(d))
    kv = block_m * block_d
    if backward:
        if block_m == 256:
            return 16, block_m, block_d, 8
        return 64, block_m, block_d, 4 if kv <= 2048 else 8
    block_n = 64 if block_m == 256 else 128 if kv <= 64 * 64 else 64
    return block_n, block_m, block_d, 8 if kv > 128 * 64 else 4


def p2c_fwd_plan(b: int, n: int, m: int, h: int, d: int, dtype: str, device: Device) -> Launch:
    block_n, block_m, block_d, warps = _p2c_blocks(n, m, d, backward=False)
    consts = (("BLOCK_N", block_n), ("BLOCK_M", block_m), ("BLOCK_D", block_d),
              ("DOT", dot_mode(dtype, device, "native")))
    stages = 1 if dtype == "fp32" and block_m * block_d > 128 * 64 else 2
    return Launch("p2c_fwd", dtype, consts, warps, stages, (cdiv(n, block_n) * b * h, 1, 1),
                  (("tiles", cdiv(n, block_n)),))


def p2c_bwd_plan(b: int, n: int, m: int, h: int, d: int, dtype: str, device: Device) -> Launch:
    """Deterministic or not is a runtime argument of the kernel: the same compiled kernel either way."""
    block_n, block_m, block_d, warps = _p2c_blocks(n, m, d, backward=True)
    if dtype == "fp32" and block_m * block_d >= 128 * 128 and block_n > 32:
        block_n = 32  # fp32 128×128: 64 queries took 230,400 B of shared memory under Triton 3.6 (of 232,448)
    consts = (("BLOCK_N", block_n), ("BLOCK_M", block_m), ("BLOCK_D", block_d),
              ("DOT", dot_mode(dtype, device, "native")))
    stages = 1 if dtype == "fp32" and block_m * block_d > 128 * 64 else 2
    return Launch("p2c_bwd", dtype, consts, warps, stages, (cdiv(n, block_n) * b * h, 1, 1),
                  (("tiles", cdiv(n, block_n)),))


# -- every configuration --------------------------------------------------------------------------

#: The supported range the enumeration covers (the advertised limits live in triton/__init__.py).
_SIZES_N = (1, 16, 17, 32, 33, 64, 65, 128, 129, 196, 784, 3136, 20_000)
_SIZES_B = (1, 2, 4, 64, 65_536)


def p2c_fits(m: int, d: int, max_keys: int, max_head_dim: int, max_key_tile: int) -> bool:
    """Whether p2c_attention's launchers serve M keys of head dim d (the triton backend's limits)."""
    return m <= max_keys and d <= max_head_dim and max(16, next_power_of_2(m)) * max(16, next_power_of_2(d)) \
        <= max_key_tile


def configurations(device: Device = H100, max_keys: int = 256, max_head_dim: int = 128,
                   max_key_tile: int = 256 * 64, max_channels: int = 1024, dtypes: tuple[str, ...] = DTYPES,
                   sms_choices: tuple[int, ...] = (1, 2, 3, 4, 132)) -> list[tuple[Launch, tuple]]:
    """Every launch the planners can return over the supported range, one per distinct compiled kernel
    (the first shape that gives it), as ``(launch, shape)``; every launch's grid is checked on the way.

    Covered: each dtype; M = 1..max_keys and d = 1..max_head_dim through each power-of-two bracket's
    ends; C through each bracket up to max_channels; N and B small to large (B·h up to and past the
    65,535 of grid axis 1); split counts for devices of ``sms_choices`` SMs. Deterministic or not, with
    or without LayerNorm weight and bias: runtime arguments, the same compiled kernels.
    """
    found: dict[tuple, tuple[Launch, tuple]] = {}

    def add(launch: Launch, shape: tuple) -> None:
        launch.check_grid()
        found.setdefault(launch.key(), (launch, shape))

    brackets = lambda top: sorted({v for p in range(12) for v in (2**p, 2**p + 1) if v <= top})
    devices = [Device(sms=s, shared_bytes=device.shared_bytes, interpreted=device.interpreted)
               for s in sms_choices]
    for dtype in dtypes:
        for m, d, n, b in product(brackets(max_keys), brackets(max_head_dim), _SIZES_N, _SIZES_B):
            if not p2c_fits(m, d, max_keys, max_head_dim, max_key_tile):
                continue
            h = 1 if b > 64 else 2
            add(p2c_fwd_plan(b, n, m, h, d, dtype, device), ("p2c_fwd", b, n, m, h, d))
            add(p2c_bwd_plan(b, n, m, h, d, dtype, device), ("p2c_bwd", b, n, m, h, d))
        for m, c, n, b in product(brackets(max_keys), brackets(max_channels), _SIZES_N, _SIZES_B):
            add(cluster_pool_bwd_plan(b, m, n, c, dtype, device), ("cluster_pool_bwd", b, m, n, c))
            for dev in devices:
                fwd = cluster_pool_fwd_plan(b, m, n, c, dtype, dev)
                add(fwd, ("cluster_pool_fwd", b, m, n, c, dev.sms))
                if fwd.get("splits") > 1:
                    add(cluster_pool_merge_plan(b, m, c, fwd.get("splits"), dtype, dev),
                        ("cluster_pool_merge", b, m, c, fwd.get("splits")))
    return list(found.values())
