"""The C++/CUDA extension of convit-kernels; everything else is in pyproject.toml.

``pip install .`` (isolated build: pip installs setuptools, torch and ninja for
the build) or ``pip install --no-build-isolation -e .`` (the README's fast path:
the installed torch builds it). Builds the CPU part (convit_kernels._C) and the
CUDA part (convit_kernels._C_cuda), both on the LibTorch stable ABI, the latter
when torch has CUDA and nvcc is found, with or without a GPU; CONVIT_KERNELS_NO_CUDA=1 skips
it. A part that cannot be built (no torch at build time, no C++ compiler, no
nvcc, a failed compile) is skipped with one line saying why: the install goes
on, the package imports, and ``convit-kernels backends`` says what is missing;
the part is then built with ninja on first use once a compiler is there.
See csrc/build_config.py.
"""

import importlib.machinery
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(message: str) -> None:
    print(f"convit-kernels: {message}", flush=True)


def _build_config():
    spec = importlib.util.spec_from_file_location("build_config", os.path.join(ROOT, "csrc", "build_config.py"))
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    return config


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the package (convit_kernels/csrc), so that an installed wheel can JIT-build a part."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "convit_kernels", "csrc")
        shutil.copytree(
            os.path.join(ROOT, "csrc"),
            target,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.o", "*.so"),
        )


def _extensions_and_commands():
    """The extension modules that can be built here, and the build commands; prints why a part is skipped."""
    cmdclass = {"build_py": BuildPyWithSources}
    try:
        import torch  # noqa: F401
    except ImportError:
        _say("not building the C++/CUDA extension: torch is not installed in the build environment")
        return [], cmdclass
    config = _build_config()
    cuda_home, cuda_archs, why_not_cuda = config.configure_cuda()
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if cuda_home is not None:  # the toolkit torch's helpers use (they found theirs at import, maybe another)
        cpp_extension.CUDA_HOME = cuda_home

    class BuildExtensionOrSkip(BuildExtension.with_options(use_ninja=True)):
        """torch's BuildExtension, but a part that fails to compile is skipped (one line) instead of failing."""

        def build_extensions(self):
            self._skipped = set()
            super().build_extensions()
            self.extensions = [ext for ext in self.extensions if ext.name not in self._skipped]

        def copy_extensions_to_source(self):
            """--inplace: also remove a part's file with another suffix, which Python would import first.

            The CUDA part was _C_cuda.cpython-3XX-*.so before it moved to the stable ABI (_C_cuda.abi3.so);
            Python tries the interpreter's own suffix before .abi3.so, so the old file would shadow the new one.
            """
            for ext in self.extensions:
                target = os.path.join(ROOT, self.get_ext_filename(ext.name))
                stem = os.path.join(os.path.dirname(target), ext.name.rpartition(".")[2])
                for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                    if stem + suffix != target and os.path.exists(stem + suffix):
                        _say(f"removing {os.path.relpath(stem + suffix, ROOT)}, an older build of {ext.name}")
                        os.remove(stem + suffix)
            super().copy_extensions_to_source()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # a compiler error, a missing header, a killed nvcc
                reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                _say(f"not building {ext.name}: the compile failed ({reason}); it is built on first use instead")
                self._skipped.add(ext.name)

    cmdclass["build_ext"] = BuildExtensionOrSkip

    def relative(paths):  # setuptools wants sources relative to setup.py
        return [os.path.relpath(p, ROOT) for p in paths]

    why_not_cpu = config.why_no_cxx()
    if why_not_cpu is not None:
        _say(f"not building the C++/CUDA extension: {why_not_cpu}; it is built on first use once there is one")
        return [], cmdclass
    ext_modules = [
        CppExtension(
            "convit_kernels._C",
            relative(config.CPU_SOURCES),
            extra_compile_args={"cxx": config.cxx_flags()},
            extra_link_args=config.link_flags(),
            py_limited_api=True,
        )
    ]
    if cuda_home is not None:
        ext_modules.append(
            CUDAExtension(
                "convit_kernels._C_cuda",
                relative(config.CUDA_SOURCES),
                include_dirs=config.nvidia_include_dirs(),
                extra_compile_args={"cxx": config.cuda_cxx_flags(), "nvcc": config.nvcc_flags(cuda_archs)},
                py_limited_api=True,
            )
        )
    else:
        _say(f"not building the CUDA part: {why_not_cuda}")
    cmdclass["build_ext"] = BuildExtensionOrSkip
    return ext_modules, cmdclass


ext_modules, cmdclass = _extensions_and_commands()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
