"""How the extension is built: its sources, flags, the CUDA toolkit and architectures.

Shared by ``setup.py`` (ahead-of-time build), which loads this file by path before anything is
built, and :mod:`convit_kernels.extension_loader` (the build with ninja on first use where the
package was installed without building a part, and the install's notes on why). Plain functions
of the standard library that import nothing of the package and read none of its settings (the
callers hand CONVIT_KERNELS_NO_CUDA over, :mod:`convit_kernels.settings`).

The sources are C++/CUDA files: csrc/ of a checkout, which ``setup.py``'s build_py copies into
the package (convit_kernels/csrc) so that an installed wheel can build a part too.

Both parts, CPU and CUDA, are compiled against the LibTorch stable ABI
(torch/csrc/stable and the C shim, TORCH_TARGET_VERSION = STABLE_ABI_TARGET,
Python's limited API): one build loads on every torch from that version on.
Both carry a build tag (tag_flags) that the loader reads from the file before
loading it, to refuse a mismatch (a torch older than the target, or a build
from before the CUDA part moved to the stable ABI) with a clear message
instead of an undefined-symbol error.

Environment (other software's variables, read here):
    TORCH_CUDA_ARCH_LIST       architectures of the CUDA part, default DEFAULT_CUDA_ARCHS;
                               those the toolkit's nvcc cannot target are dropped with a warning
                               (CUDA 13 dropped sm_70: with torch+cu130, whose own kernels start at
                               sm_75, the CUDA part covers sm_75..sm_90; a CUDA 12 toolkit keeps sm_70).
    CUDA_HOME                  the toolkit root; found from the nvcc on PATH when unset.
    CXX                        the C++ compiler of the CPU part (default c++).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import warnings

PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Each part's sources, relative to the sources' folder (sources_dir).
CPU_SOURCES = ("cpu/gpsa_cpu.cpp", "cpu/positional_mix_cpu.cpp")
CUDA_SOURCES = ("cuda/gpsa_cuda.cu",)
# Beside where a part's file would be: why the install did not build it (read by `convit-kernels backends`).
NOT_BUILT_SUFFIX = ".not-built.txt"


def sources_dir() -> str:
    """The extension's sources: the package's copy (an installed wheel), else the checkout's csrc/ beside it."""
    copy = os.path.join(PACKAGE, "csrc")
    return copy if os.path.isdir(copy) else os.path.join(os.path.dirname(PACKAGE), "csrc")


def source_paths(names, root: str | None = None) -> list:
    """The paths of ``names`` (CPU_SOURCES, CUDA_SOURCES) under ``root``, by default :func:`sources_dir`."""
    root = sources_dir() if root is None else root
    return [os.path.join(root, *name.split("/")) for name in names]


def not_built_note(package_dir: str, module: str) -> str:
    """The path of the note that says why ``module`` (e.g. "convit_kernels._C_cuda") was not built."""
    return os.path.join(package_dir, module.rpartition(".")[2] + NOT_BUILT_SUFFIX)


DEFAULT_CUDA_ARCHS = "7.0;7.5;8.0;8.6;9.0"
# The oldest torch both parts (stable ABI) load on: torch::stable::parallel_for, empty(), sum() and
# STD_CUDA_KERNEL_LAUNCH_CHECK came in 2.10.
STABLE_ABI_TARGET = (2, 10)
# Python's limited API for the parts' empty modules (their files are _C.abi3.so and _C_cuda.abi3.so).
PY_LIMITED_API = "0x030B0000"


def torch_version() -> tuple:
    """(major, minor, patch) of the torch in this process, without the local part (+cu130)."""
    import torch

    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)\.(\d+)", torch.__version__).groups())


def tag_flags() -> list:
    """Macros of the stable ABI build and its tag: the torch compiled against and the oldest torch it loads on."""
    major, minor, patch = torch_version()
    target_major, target_minor = STABLE_ABI_TARGET
    return [
        f"-DCONVIT_KERNELS_TORCH_MAJOR={major}",
        f"-DCONVIT_KERNELS_TORCH_MINOR={minor}",
        f"-DCONVIT_KERNELS_TORCH_PATCH={patch}",
        f"-DTORCH_TARGET_VERSION=0x{target_major:02x}{target_minor:02x}000000000000",
        f"-DCONVIT_KERNELS_TARGET_MAJOR={target_major}",
        f"-DCONVIT_KERNELS_TARGET_MINOR={target_minor}",
        f"-DPy_LIMITED_API={PY_LIMITED_API}",
    ]


def why_no_cxx():
    """None when a C++ compiler is found, else why not (the CPU part needs one)."""
    cxx = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(cxx) is None:
        return f"no C++ compiler found ({cxx!r} is not on PATH; install g++ or set CXX)"
    return None


# Kernels that build both per-axis positional tables whole (H (W^2 + H_p^2) numbers) do so only where they hold at
# most this many numbers per token and head: grids up to about 16:1, never a 1 x 4096 strip (docs/design.md). The
# torch side reads it here (separable.py) and the C++ kernel as CONVIT_WHOLE_TABLES_PER_TOKEN (cxx_flags).
WHOLE_TABLES_PER_TOKEN = 16


def cxx_flags() -> list:
    # -fopenmp: at::parallel_for is inlined from ATen's headers and runs serially without it.
    # -fopenmp-simd is implied; the hot loops carry `omp simd` reductions.
    flags = ["-O3", "-fopenmp", f"-DCONVIT_WHOLE_TABLES_PER_TOKEN={WHOLE_TABLES_PER_TOKEN}"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ["-mavx2", "-mfma", "-mf16c"]  # every x86-64 CPU since 2013; the BLAS calls dispatch on their own
    return flags + tag_flags()


def link_flags() -> list:
    return ["-fopenmp"]


# The C shim declares its CUDA functions (current stream, STD_CUDA_KERNEL_LAUNCH_CHECK's) under USE_CUDA.
CUDA_SHIM_FLAGS = ["-DUSE_CUDA"]


def cuda_cxx_flags() -> list:
    """Host compiler flags of the CUDA part (its sources are .cu files: only used for a .cpp among them)."""
    return ["-O3"] + CUDA_SHIM_FLAGS + tag_flags()


def arch_flags(archs: str) -> list:
    """nvcc's -gencode flags for an arch list such as "8.0;9.0+PTX" (torch then adds none of its own)."""
    flags = []
    for arch in archs.split(";"):
        number = arch.split("+")[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def nvcc_flags(archs: str) -> list:
    # --threads 2: nvcc compiles two architectures at a time (the machine's two cores).
    base = ["-O3", "--threads", "2", "-lineinfo", "--expt-relaxed-constexpr"]
    return base + arch_flags(archs) + CUDA_SHIM_FLAGS + tag_flags()


def find_cuda_home():
    """The CUDA toolkit root, or None. The nvcc on PATH may be a wrapper script, so ask nvcc itself where it runs."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    bin_dir = match.group(1).strip() if match else os.path.dirname(os.path.realpath(nvcc))
    home = os.path.dirname(bin_dir)
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def nvidia_include_dirs() -> list:
    """include/ folders of the installed nvidia pip packages that hold the CUDA library headers torch includes."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        for inc in sorted(glob.glob(os.path.join(root, "include")) + glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cublas_v2.h")) or os.path.exists(os.path.join(inc, "cusparse.h")):
                dirs.append(inc)
    return dirs


def cuda_arch_list(cuda_home: str) -> str:
    """TORCH_CUDA_ARCH_LIST restricted to what this nvcc can compile for (CUDA 13 dropped sm_70)."""
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    listing = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True, text=True, timeout=60
    ).stdout
    supported = {m.replace("compute_", "") for m in re.findall(r"compute_\d+", listing)}
    kept, dropped = [], []
    for arch in re.split(r"[;\s]+", requested.strip()):
        if not arch:
            continue
        (kept if arch.split("+")[0].replace(".", "") in supported else dropped).append(arch)
    if dropped:
        warnings.warn(
            f"convit-kernels: nvcc in {cuda_home} cannot target {', '.join(dropped)}: building for {kept}", stacklevel=2
        )
    return ";".join(kept)


def configure_cuda(disabled: bool):
    """(toolkit root, arch list, None) when the CUDA part can be built here, else (None, None, reason).

    ``disabled``: CONVIT_KERNELS_NO_CUDA as the caller read it. Writes nothing: the caller hands
    the root to torch.utils.cpp_extension (its CUDA_HOME) and the arch list to :func:`nvcc_flags`.
    """
    import torch

    if disabled:
        return None, None, "CONVIT_KERNELS_NO_CUDA is set"
    if torch.version.cuda is None:
        return None, None, "this torch build has no CUDA"
    home = find_cuda_home()
    if home is None:
        return None, None, "no nvcc found (set CUDA_HOME or put nvcc on PATH)"
    archs = cuda_arch_list(home)
    if not archs:
        return None, None, f"nvcc in {home} supports none of the requested architectures"
    return home, archs, None
