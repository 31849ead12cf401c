"""Build driver for paca_kernels: CMake (CMakeLists.txt) compiles paca_kernels._C, this file runs it.

    pip install --no-build-isolation -e .    # editable: _C*.so lands in paca_kernels/ of the tree
    pip install --no-build-isolation .       # regular wheel install

--no-build-isolation is required: the extension is compiled against the torch installed in the
environment (an isolated build would download and build against a different torch).

Environment knobs:
    PACA_KERNELS_BUILD_CUDA=auto|0|1  auto (default): CUDA kernels iff torch is a CUDA build and
                                      nvcc is found (CUDA_HOME, CUDA_PATH, PATH); never decided
                                      by torch.cuda.is_available() (build machines have no GPU).
    PACA_KERNELS_CUDA_ARCHS="80;90"   CMAKE_CUDA_ARCHITECTURES of the CUDA kernels.
    MAX_JOBS=N                        parallel compile jobs (ninja -j).
    PACA_KERNELS_SKIP_EXT=1           pure-Python install, no extension (reference backend only).
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import SetupError

ROOT = Path(__file__).resolve().parent
BUILD_INFO = "_build_info.json"
# The CUDA kernels' size limits: parsed from their one source, csrc/cuda/limits.h, into the build
# info (also for CPU-only builds), for paca_kernels._ext.kernel_limits("cuda").
CUDA_LIMITS_HEADER = ROOT / "csrc" / "cuda" / "limits.h"
CUDA_LIMITS = {
    "max_keys": "kMaxKeys",
    "max_head_dim": "kMaxHeadDim",
    "max_channels": "kMaxChannels",
    "max_channels_small_smem": "kMaxChannelsSmallSmem",
    "smem_per_block_sm80": "kSmemPerBlockSm80",
    "smem_per_block_sm90": "kSmemPerBlockSm90",
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_nvcc() -> Path | None:
    """nvcc from CUDA_HOME, then CUDA_PATH, then PATH (the order torch.utils.cpp_extension uses).

    Returns the real toolkit's bin/nvcc when PATH holds a wrapper script (e.g. /usr/local/bin/nvcc
    exec'ing /usr/local/cuda/bin/nvcc), so that CUDAToolkit_ROOT below is a real toolkit.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found is None:
        return None
    for root in (Path(found).resolve().parent.parent, Path("/usr/local/cuda")):
        if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
            return root / "bin" / "nvcc"
    return Path(found)


def _decide_cuda(torch_cuda: str | None, torch_version: str) -> Path | None:
    """The nvcc to build CUDA kernels with, or None for a CPU-only build (PACA_KERNELS_BUILD_CUDA)."""
    mode = os.environ.get("PACA_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        raise SetupError(f"PACA_KERNELS_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None
    nvcc = _find_nvcc()
    if mode == "auto":
        if torch_cuda is not None and nvcc is None:
            print(
                f"paca_kernels: torch {torch_version} has CUDA but no nvcc was found: CPU-only build"
            )
        return nvcc if torch_cuda is not None else None
    if torch_cuda is None:
        raise SetupError(
            f"PACA_KERNELS_BUILD_CUDA=1 but the installed torch {torch_version} is a CPU-only build "
            "(torch.version.cuda is None): install a CUDA build of torch, or use "
            "PACA_KERNELS_BUILD_CUDA=0/auto for a CPU-only extension"
        )
    if nvcc is None:
        raise SetupError(
            "PACA_KERNELS_BUILD_CUDA=1 but no nvcc was found in $CUDA_HOME/bin, $CUDA_PATH/bin "
            "or PATH: install the CUDA toolkit or point CUDA_HOME at it"
        )
    return nvcc


def _warn_cuda_mismatch(nvcc: Path, torch_cuda: str | None) -> None:
    """Warn when nvcc's major version differs from torch's: the module would need another cudart."""
    try:
        res = subprocess.run([str(nvcc), "--version"], check=False, capture_output=True, text=True)
        text = res.stdout
    except OSError:
        return
    m = re.search(r"release (\d+)\.(\d+)", text)
    if m and torch_cuda and m[1] != torch_cuda.split(".")[0]:
        print(
            f"paca_kernels: WARNING: nvcc is CUDA {m[1]}.{m[2]} but torch was built with CUDA "
            f"{torch_cuda}; the extension may fail to load (use a matching toolkit via CUDA_HOME)"
        )


def _read_limits(header: Path, names: dict[str, str]) -> dict[str, int]:
    """{key: value} of the ``constexpr int64_t <name> = <integer>;`` lines of ``header``.

    Strict: each name must be defined exactly once, on one line, with a plain decimal integer;
    anything else fails the build (SetupError) rather than shipping a limit that differs from the
    one compiled into the kernels.
    """
    try:
        text = header.read_text()
    except OSError as exc:
        raise SetupError(f"cannot read the kernel limits header {header}: {exc}") from exc
    limits = {}
    for key, name in names.items():
        found = re.findall(
            rf"^[ \t]*constexpr[ \t]+int64_t[ \t]+{re.escape(name)}[ \t]*=[ \t]*(\d+)[ \t]*;",
            text,
            flags=re.MULTILINE,
        )
        if len(found) != 1:
            raise SetupError(
                f"{header}: expected exactly one line `constexpr int64_t {name} = <integer>;`, "
                f"found {len(found)}"
            )
        limits[key] = int(found[0])
    return limits


def _torch_arch_list(archs: str) -> str | None:
    """CMake archs "80;90a" -> TORCH_CUDA_ARCH_LIST "8.0;9.0a" (torch's cmake wants that form)."""
    out = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        m = re.fullmatch(r"(\d+)(\d)([af]?)(-real|-virtual)?", arch)
        if m is None:  # "native", "all", ...: let torch's cmake pick its default
            return None
        out.append(f"{m[1]}.{m[2]}{m[3]}")
    return ";".join(out) or None


def _tool(module: str, bin_dir_attr: str, name: str, hint: str) -> str:
    """The ``name`` binary shipped by the pip package ``module`` (at ``module.<bin_dir_attr>``), else
    the one on PATH; SetupError with ``hint`` when neither exists."""
    try:
        path = Path(getattr(importlib.import_module(module), bin_dir_attr)) / name
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise SetupError(f"{name} not found: {hint}")
    return found


def _ninja() -> str:
    return _tool("ninja", "BIN_DIR", "ninja", "`pip install ninja` (or put ninja on PATH)")


def _cmake() -> str:
    return _tool("cmake", "CMAKE_BIN_DIR", "cmake", "`pip install cmake` (or put cmake >= 3.26 on PATH)")


class CMakeExtension(Extension):
    """An extension whose sources are compiled by CMakeLists.txt, not by setuptools."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """build_ext that configures and builds CMakeLists.txt with Ninja."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        try:
            import torch
            import torch.utils
        except ImportError as exc:
            raise SetupError(
                "building paca_kernels._C needs torch installed; build with "
                "`pip install --no-build-isolation .` (or set PACA_KERNELS_SKIP_EXT=1)"
            ) from exc

        nvcc = _decide_cuda(torch.version.cuda, torch.__version__)
        archs = os.environ.get("PACA_KERNELS_CUDA_ARCHS", "80;90").strip() or "80;90"
        # Where setuptools expects the module: build_lib for wheels; editable installs copy it
        # into the source tree afterwards (copy_extensions_to_source below).
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A persistent build dir per (python, torch, cuda) keeps rebuilds incremental.
        tag = re.sub(
            r"[^A-Za-z0-9_.-]",
            "_",
            f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
            f"-{'cuda' if nvcc else 'cpu'}",
        )
        build_dir = ROOT / "build" / f"cmake-{tag}"
        out_dir = build_dir / "lib"
        build_dir.mkdir(parents=True, exist_ok=True)

        cfg = [
            _cmake(),
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_ninja()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPACA_KERNELS_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DPACA_KERNELS_BUILD_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DPACA_KERNELS_CUDA_ARCHS={archs}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        env = dict(os.environ)
        if nvcc is not None:
            _warn_cuda_mismatch(nvcc, torch.version.cuda)
            cuda_home = nvcc.parent.parent
            cfg += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={cuda_home}"]
            env.setdefault("CUDA_HOME", str(cuda_home))  # torch's FindCUDA looks here
            arch_list = _torch_arch_list(archs)
            if arch_list is not None:  # keeps torch's cmake from probing for a GPU
                env["TORCH_CUDA_ARCH_LIST"] = arch_list
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(cfg, check=True, env=env)
        subprocess.run(
            [_cmake(), "--build", str(build_dir), "--", f"-j{jobs}"], check=True, env=env
        )

        built = sorted(out_dir.glob("_C.*"))
        if len(built) != 1:
            raise SetupError(f"expected one _C module in {out_dir}, found {built}")
        ext_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], ext_path)
        self._write_build_info(ext_path.parent, build_dir, torch, nvcc, archs)

    @staticmethod
    def _write_build_info(
        pkg_dir: Path, build_dir: Path, torch: object, nvcc: Path | None, archs: str
    ) -> None:
        """paca_kernels/_build_info.json: what _ext.py checks before importing _C."""
        compilers = {}
        info_file = build_dir / "paca_compiler.txt"
        if info_file.is_file():
            for line in info_file.read_text().splitlines():
                key, _, value = line.partition("=")
                compilers[key] = value.strip() or None
        limits = {"cuda": _read_limits(CUDA_LIMITS_HEADER, CUDA_LIMITS)}
        info = {
            "torch_version": torch.__version__,  # type: ignore[attr-defined]
            "torch_cuda": torch.version.cuda,  # type: ignore[attr-defined]
            "cuda_built": nvcc is not None,
            "cuda_archs": archs if nvcc is not None else None,
            "cxx_compiler": compilers.get("cxx"),
            "cuda_compiler": compilers.get("cuda") if nvcc is not None else None,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),  # type: ignore[attr-defined]
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "build_date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "limits": limits,
        }
        (pkg_dir / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")

    def copy_extensions_to_source(self) -> None:
        """Editable installs: also copy _build_info.json next to the in-tree _C*.so."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if isinstance(ext, CMakeExtension):
                # Same two locations setuptools copies the module between.
                built_dir = Path(self.build_lib) / Path(self.get_ext_filename(ext.name)).parent
                package = ext.name.rpartition(".")[0]
                src_dir = Path(build_py.get_package_dir(package))
                if (built_dir / BUILD_INFO).is_file():
                    shutil.copyfile(built_dir / BUILD_INFO, src_dir / BUILD_INFO)


ext_modules = [] if _env_flag("PACA_KERNELS_SKIP_EXT") else [CMakeExtension("paca_kernels._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
