"""Install with `pip install --no-build-isolation -e .` (torch must already be installed).

Builds the C++ extension (convit_kernels._C, CPU kernels) always, and its CUDA
part (convit_kernels._C_cuda) when torch has CUDA and nvcc is found, with or
without a GPU; CONVIT_KERNELS_NO_CUDA=1 skips it. See csrc/build_config.py.
"""

import importlib.util
import os

from setuptools import find_packages, setup


def _extensions():
    spec = importlib.util.spec_from_file_location(
        "build_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "build_config.py")
    )
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    cuda_home, why_not = config.configure_cuda()  # before cpp_extension reads CUDA_HOME
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def relative(paths):  # setuptools wants sources relative to setup.py
        return [os.path.relpath(p) for p in paths]

    ext_modules = [
        CppExtension(
            "convit_kernels._C",
            relative(config.CPU_SOURCES),
            extra_compile_args={"cxx": config.cxx_flags()},
            extra_link_args=config.link_flags(),
        )
    ]
    if cuda_home is not None:
        ext_modules.append(
            CUDAExtension(
                "convit_kernels._C_cuda",
                relative(config.CUDA_SOURCES),
                include_dirs=config.nvidia_include_dirs(),
                extra_compile_args={"cxx": ["-O3"], "nvcc": config.nvcc_flags()},
            )
        )
    else:
        print(f"convit-kernels: not building the CUDA part: {why_not}")
    return ext_modules, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _version() -> str:
    """convit_kernels/_version.py, read without importing the package (which needs torch and timm)."""
    namespace = {}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "convit_kernels", "_version.py")) as f:
        exec(f.read(), namespace)
    return namespace["__version__"]


ext_modules, cmdclass = _extensions()

setup(
    name="convit-kernels",
    version=_version(),
    description="Fused gated positional self-attention (GPSA) kernels for ConViT: Triton, C++ and CUDA",
    packages=find_packages(include=["convit_kernels", "convit_kernels.*"]),
    python_requires=">=3.11",  # the version CI tests
    install_requires=["torch>=2.4", "triton", "ninja", "timm>=1.0", "torchvision", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn"]},
    entry_points={"console_scripts": ["convit-kernels=convit_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
