"""Install with `pip install --no-build-isolation -e .` (torch must already be installed)."""

from setuptools import find_packages, setup

setup(
    name="convit-kernels",
    version="0.1.0",
    description="Fused gated positional self-attention (GPSA) kernels for ConViT: Triton, C++ and CUDA",
    packages=find_packages(include=["convit_kernels", "convit_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton", "ninja", "einops", "timm>=1.0", "torchvision", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn"]},
    entry_points={"console_scripts": ["convit-kernels=convit_kernels.cli:main"]},
)
