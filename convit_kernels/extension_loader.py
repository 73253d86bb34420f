"""The C++/CUDA extension (csrc/): find its built parts, validate their build tags, load them, or build them.

``pip install --no-build-isolation -e .`` builds ``convit_kernels._C`` (CPU part, which defines the
``convit_kernels_ext`` ops) and ``convit_kernels._C_cuda`` (their CUDA implementations), both on
the LibTorch stable ABI. A part is loaded only after its build tag (read from the file) says it
can load in this torch; otherwise, or where it was not built, its first use builds it with ninja
(torch.utils.cpp_extension.load, cached under ~/.cache/torch_extensions), and when that cannot
happen the reason says which torch it was built for and how to rebuild it. The backends that run
the ops are in :mod:`convit_kernels.backends.extension`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re

import torch

from . import build_config, settings

__all__ = ["load_cpu", "load_cuda", "import_built", "build_tag", "why_not_built", "describe"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_HOW_TO_REBUILD = (
    "reinstall convit-kernels against this torch (pip install --force-reinstall --no-deps convit-kernels, "
    "or pip install --no-build-isolation -e . in a checkout), or install a C++ compiler (and nvcc for the "
    "CUDA part) and it is built with ninja on first use"
)


def _torch_version() -> tuple[int, int, int]:
    return tuple(int(p) for p in re.match(r"(\d+)\.(\d+)\.(\d+)", torch.__version__).groups())


def build_tag(path: str) -> dict | None:
    """The build tag in a built part's file ({'abi': 'stable', 'torch': '2.14.1', ...}), or None when it has none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    match = re.search(rb"CONVIT_KERNELS_BUILD_TAG\{([^}]*)\}", data)
    if match is None:
        return None
    return dict(item.split("=", 1) for item in match.group(1).decode().split(";") if "=" in item)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _mismatch(module: str, path: str) -> str | None:
    """Why the built file of ``module`` cannot load in this torch, or None when it can (read before loading)."""
    tag = build_tag(path)
    if tag is None:
        return None  # a build from before the tag: try it, and explain an undefined symbol (import_built)
    here = torch.__version__
    if tag.get("abi") == "stable":
        if _torch_version()[:2] < _version_tuple(tag["min_torch"]):
            return (
                f"{module} is built on the LibTorch stable ABI for torch >= {tag['min_torch']} "
                f"(built with torch {tag['torch']}), and this is torch {here}"
            )
        return None
    if _version_tuple(tag["torch"]) != _torch_version():
        return (
            f"{module} was built for torch {tag['torch']} (torch's C++ ABI, which changes with every release) "
            f"and this is torch {here}"
        )
    return None


def import_built(module: str) -> str | None:
    """Import a built part, after validating its build tag; None when imported, else why not."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return f"{module} is not built"
    mismatch = _mismatch(module, spec.origin)
    if mismatch is not None:
        return mismatch
    try:
        importlib.import_module(module)
        return None
    except ImportError as exc:
        if "undefined symbol" in str(exc):
            return f"{module} ({spec.origin}) was built for another torch than this torch {torch.__version__}"
        return f"{module} did not load ({exc})"


def _jit_build(name: str, cuda: bool) -> None:
    """Build and load one part of the extension with ninja; raises when it cannot."""
    sources = build_config.source_paths(build_config.CUDA_SOURCES if cuda else build_config.CPU_SOURCES)
    missing = [path for path in sources if not os.path.exists(path)]
    if missing:
        raise ImportError(f"the package was installed without its sources ({missing[0]} is missing)")
    why_no_cxx = build_config.why_no_cxx()
    if why_no_cxx is not None:
        raise ImportError(why_no_cxx)
    cuda_archs = None
    if cuda:
        cuda_home, cuda_archs, why_not = build_config.configure_cuda(settings.enabled("CONVIT_KERNELS_NO_CUDA"))
        if cuda_home is None:
            raise ImportError(why_not)
    import torch.utils.cpp_extension as cpp_extension

    if cuda:
        cpp_extension.CUDA_HOME = cuda_home  # torch found its own at import, maybe another toolkit
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=build_config.cuda_cxx_flags() if cuda else build_config.cxx_flags(),
        extra_cuda_cflags=build_config.nvcc_flags(cuda_archs) if cuda else None,
        extra_ldflags=[] if cuda else build_config.link_flags(),
        extra_include_paths=build_config.nvidia_include_dirs() if cuda else None,
        is_python_module=False,
        verbose=False,
    )


def _load(module: str, jit_name: str, cuda: bool) -> str | None:
    """Import a built part of the extension, or JIT-build it; return None or why it is unavailable."""
    built_error = import_built(module)
    if built_error is None:
        return None
    note = _install_note(module)
    if note is not None and note.startswith("the compile failed"):
        # The same sources would fail the same way in every process that asks for the part (minutes each).
        return (
            f"{built_error}: at install {note}; it is not built again on first use: fix that and reinstall "
            "(pip install --no-build-isolation -e . in a checkout, or pip install --force-reinstall --no-deps "
            "convit-kernels)"
        )
    try:
        _jit_build(jit_name, cuda)
        return None
    except Exception as exc:  # a failed build leaves the backend unavailable, with the reason
        why = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        return f"{built_error}; the build on first use failed: {why}. To get it: {_HOW_TO_REBUILD}"


@functools.cache
def load_cpu() -> str | None:
    """Load the CPU part (defines the ext ops); None when loaded, else why not."""
    return _load("convit_kernels._C", "convit_kernels_ext_cpu", cuda=False)


@functools.cache
def load_cuda() -> str | None:
    """Load the CUDA part (the ops' CUDA implementations); None when loaded, else why not."""
    problem = load_cpu()
    if problem is not None:
        return f"the CPU part, which defines the ops, is unavailable: {problem}"
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    built_error = import_built("convit_kernels._C_cuda")
    if built_error is None:
        return None
    if not torch.cuda.is_available():  # nothing to run it on: no point compiling it now
        return built_error
    problem = _load("convit_kernels._C_cuda", "convit_kernels_ext_cuda", cuda=True)
    return problem


def _install_note(module: str) -> str | None:
    """What setup.py noted beside the package on why it did not build ``module``; None when it noted nothing."""
    try:
        with open(build_config.not_built_note(_PACKAGE, module)) as f:
            return f.read().strip() or "(the install's note is empty)"
    except OSError:
        return None


def why_not_built(module: str) -> str:
    """Why the install did not build ``module``, as setup.py noted it (or that it noted nothing)."""
    return _install_note(module) or "the install left no note (not installed with pip from these sources)"


def describe() -> list[str]:
    """One line per part of the extension: which file, built for which torch and ABI (for `convit-kernels backends`)."""
    lines = []
    for module, what in (("convit_kernels._C", "CPU part"), ("convit_kernels._C_cuda", "CUDA part")):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            lines.append(
                f"{what}: not built at install ({why_not_built(module)}); built with ninja on first use "
                f"(sources: {build_config.sources_dir()})"
            )
            continue
        tag = build_tag(spec.origin) or {}
        abi = (
            f"stable ABI, loads on torch >= {tag['min_torch']}"
            if tag.get("abi") == "stable"
            else f"torch's C++ ABI, loads on torch {tag.get('torch', '(unknown)')} only"
        )
        lines.append(f"{what}: {spec.origin} (built with torch {tag.get('torch', '(unknown)')}; {abi})")
    return lines
