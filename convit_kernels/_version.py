"""The package version: the one place setup.py and convit_kernels.__version__ read it from."""

__version__ = "0.1.0"
