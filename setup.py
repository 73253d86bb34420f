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
See convit_kernels/build_config.py.
"""

import contextlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import sys
import tempfile

import setuptools
from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
# pyproject.toml's SPDX `license` field: older setuptools stop on it with a schema error (--no-build-isolation
# uses the installed one).
MIN_SETUPTOOLS = (77, 0)
if tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2]) < MIN_SETUPTOOLS:
    sys.exit(
        f"convit-kernels: setuptools {setuptools.__version__} is too old to read pyproject.toml; "
        f"pip install 'setuptools>={MIN_SETUPTOOLS[0]}' first"
    )


def _say(message: str) -> None:
    print(f"convit-kernels: {message}", flush=True)


def _package_module(name: str):
    """convit_kernels/<name>.py by path: importing the package would import torch and the parts being built."""
    spec = importlib.util.spec_from_file_location(
        f"convit_kernels_setup_{name}", os.path.join(ROOT, "convit_kernels", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


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


@contextlib.contextmanager
def _file_descriptors_to(file):
    """Send file descriptors 1 and 2 (children's too) to ``file``; copy what it got to stdout afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        file.seek(0)
        sys.stdout.buffer.write(file.read())  # pip -v shows it as before
        sys.stdout.flush()


def _first_error(output, exc: Exception) -> str:
    """The first compiler line that says "error" (nvcc's and gcc's "file(line): error: ..."), else the exception."""
    output.seek(0)
    for line in output.read().decode(errors="replace").splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE) and "Error compiling objects" not in line:
            return line.strip()[:400]
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _extensions_and_commands():
    """The extension modules that can be built here, and the build commands; prints why a part is skipped."""
    cmdclass = {"build_py": BuildPyWithSources}
    try:
        import torch  # noqa: F401
    except ImportError:
        _say("not building the C++/CUDA extension: torch is not installed in the build environment")
        return [], cmdclass
    config, settings = _package_module("build_config"), _package_module("settings")
    cuda_home, cuda_archs, why_not_cuda = config.configure_cuda(settings.enabled("CONVIT_KERNELS_NO_CUDA"))
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if cuda_home is not None:  # the toolkit torch's helpers use (they found theirs at import, maybe another)
        cpp_extension.CUDA_HOME = cuda_home

    # Not BuildExtension.with_options(use_ninja=True): ninja is its default, and setuptools 77's Command
    # refuses the extra keyword that with_options hands down.
    class BuildExtensionOrSkip(BuildExtension):
        """torch's BuildExtension, but a part that fails to compile is skipped (one line) instead of failing."""

        def build_extensions(self):
            super().build_extensions()
            self.extensions = [ext for ext in self.extensions if self._why_not_built.get(ext.name) is None]

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
            with tempfile.TemporaryFile() as output:
                try:
                    with _file_descriptors_to(output):  # the compilers' output, which torch's ninja run prints
                        super().build_extension(ext)
                    self._why_not_built[ext.name] = None
                except Exception as exc:  # a compiler error, a missing header, a killed nvcc
                    self._why_not_built[ext.name] = f"the compile failed: {_first_error(output, exc)}"

        def run(self):
            self._why_not_built = {} if why_not_cuda is None else {"convit_kernels._C_cuda": why_not_cuda}
            super().run()
            # After run: with --inplace (editable installs) the parts' paths are now the source package's.
            for module, reason in self._why_not_built.items():
                if reason is not None:
                    _say(f"not building {module}: {reason}; it is built on first use instead")
                self._note(module, reason)

        def _note(self, module, reason):
            """Write (or, once built, remove) the note `convit-kernels backends` reads: why a part is missing."""
            note = config.not_built_note(os.path.dirname(self.get_ext_fullpath(module)), module)
            if os.path.lexists(note):
                os.remove(note)  # stale, or a link planted in its place: never written through
            if reason is not None:
                os.makedirs(os.path.dirname(note), exist_ok=True)
                with open(note, "x") as f:
                    f.write(reason + "\n")

    cmdclass["build_ext"] = BuildExtensionOrSkip

    def sources(names):  # the checkout's, relative to setup.py as setuptools wants them
        return [os.path.relpath(p, ROOT) for p in config.source_paths(names, os.path.join(ROOT, "csrc"))]

    why_not_cpu = config.why_no_cxx()
    if why_not_cpu is not None:
        _say(f"not building the C++/CUDA extension: {why_not_cpu}; it is built on first use once there is one")
        return [], cmdclass
    ext_modules = [
        CppExtension(
            "convit_kernels._C",
            sources(config.CPU_SOURCES),
            extra_compile_args={"cxx": config.cxx_flags()},
            extra_link_args=config.link_flags(),
            py_limited_api=True,
        )
    ]
    if cuda_home is not None:
        ext_modules.append(
            CUDAExtension(
                "convit_kernels._C_cuda",
                sources(config.CUDA_SOURCES),
                include_dirs=config.nvidia_include_dirs(),
                extra_compile_args={"cxx": config.cuda_cxx_flags(), "nvcc": config.nvcc_flags(cuda_archs)},
                py_limited_api=True,
            )
        )
    cmdclass["build_ext"] = BuildExtensionOrSkip
    return ext_modules, cmdclass


ext_modules, cmdclass = _extensions_and_commands()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
