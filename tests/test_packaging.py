"""Packaging: `python -m build` makes an sdist and a wheel, and the wheel works in a fresh virtual environment.

One build per test session (the CPU part only: CONVIT_KERNELS_NO_CUDA=1, about a
minute on 2 cores): `python -m build` builds the sdist, then the wheel from the
unpacked sdist, each in an isolated build environment that installs the build
requirements of pyproject.toml as plain `pip install .` does (torch from the
package index pip is configured with), so the wheel also proves the sdist
complete and the isolated build working. The
wheel is installed with --no-deps into a venv without system site-packages
that reaches this Python's torch (and everything else installed here) through
a .pth file, so no torch is downloaded; the console script and the op run from
that venv, outside the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

import convit_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# Forward and backward of the installed wheel's "cpu" backend against the reference, without timm.
FORWARD_BACKWARD = r"""
import sys
sys.modules["timm"] = None  # the op and FusedGPSA must not need timm
import torch, convit_kernels
from convit_kernels.extension_loader import load_cpu
assert load_cpu() is None, load_cpu()
import convit_kernels._C as ext
from convit_kernels import build_config
print("extension", ext.__file__)
print("sources", build_config.sources_dir())
torch.manual_seed(0)
B, H, N, d = 2, 3, 49, 16
q, k, v = (torch.randn(B, H, N, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
w = torch.randn(H, 3, dtype=torch.float64, requires_grad=True)
b = torch.randn(H, dtype=torch.float64, requires_grad=True)
g = torch.randn(H, dtype=torch.float64, requires_grad=True)
leaves = (q, k, v, w, g)
out = convit_kernels.gpsa_attention(q, k, v, w, b, g, backend="cpu")
grads = torch.autograd.grad((out * out).sum(), leaves)
ref = convit_kernels.gpsa_reference(q, k, v, w, b, g, (7, 7), d ** -0.5)
ref_grads = torch.autograd.grad((ref * ref).sum(), leaves)
assert torch.allclose(out, ref, rtol=1e-9, atol=1e-11), (out - ref).abs().max()
for got, want in zip(grads, ref_grads):
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10), (got - want).abs().max()
layer = convit_kernels.FusedGPSA(48, 3, use_local_init=True, backend="cpu")
layer(torch.randn(2, 49, 48)).sum().backward()
print("timm imported:", any(m.startswith("timm.") for m in sys.modules))
print("forward/backward ok", convit_kernels.__version__, convit_kernels.__file__)
"""


def _clean_env() -> dict:
    """This environment without PYTHONPATH, so that the venv runs the installed wheel and not a checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _run(cmd, **kwargs):
    kwargs.setdefault("env", _clean_env())
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="session")
def dist(tmp_path_factory):
    """sdist and wheel of this checkout, built once (CPU part only)."""
    pytest.importorskip("build", reason="python -m build is needed (requirements.txt pins it)")
    out = tmp_path_factory.mktemp("dist")
    env = dict(_clean_env(), CONVIT_KERNELS_NO_CUDA="1", MAX_JOBS="2")
    _run([sys.executable, "-m", "build", "--outdir", str(out), ROOT], env=env, cwd=str(out))
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="session")
def venv(dist, tmp_path_factory):
    """A fresh venv holding the wheel; this Python's site-packages (torch) reached through a .pth file."""
    path = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    python = path / "bin" / "python"
    venv_site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    with open(os.path.join(venv_site, "_reuse_torch.pth"), "w") as f:
        f.write("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(dist[1])])
    return path


def test_version_from_one_place():
    namespace = {}
    with open(os.path.join(ROOT, "convit_kernels", "_version.py")) as f:
        exec(f.read(), namespace)
    assert convit_kernels.__version__ == namespace["__version__"]


def test_sdist_holds_the_sources(dist):
    sdist, _ = dist
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in (
        "pyproject.toml",
        "setup.py",
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "requirements.txt",
        "convit_kernels/build_config.py",
        "csrc/cpu/simd.h",
        "csrc/gpsa_common.h",
        "csrc/gpsa_ops.h",
        "csrc/build_tag.h",
        "csrc/cpu/gpsa_cpu.cpp",
        "csrc/cuda/gpsa_cuda.cu",
        "tests/test_packaging.py",
        "tests/gpsa_cases.py",
    ):
        assert needed in names, needed


def test_wheel_holds_the_cpu_part_sources_and_license(dist):
    _, wheel = dist
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.startswith("convit_kernels/_C.") and n.endswith(".so") for n in names), names
    assert "convit_kernels/csrc/cpu/gpsa_cpu.cpp" in names  # for a JIT build of a part the wheel lacks
    assert "convit_kernels/csrc/cpu/simd.h" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert f"Version: {convit_kernels.__version__}" in metadata
    assert "License-Expression: MIT" in metadata
    assert 'Requires-Dist: timm>=1.0.21; extra == "timm"' in metadata
    assert not any(line.startswith("Requires-Dist: timm") and "extra" not in line for line in metadata.splitlines())


def test_installed_wheel_lists_backends_and_runs(venv, tmp_path):
    backends = _run([str(venv / "bin" / "convit-kernels"), "backends"], cwd=str(tmp_path)).stdout
    assert "cpu        yes" in backends, backends
    assert "stable ABI" in backends, backends
    result = _run([str(venv / "bin" / "python"), "-c", FORWARD_BACKWARD], cwd=str(tmp_path)).stdout
    assert "forward/backward ok" in result, result
    assert "timm imported: False" in result, result
    assert f"extension {venv}" in result, result  # the wheel's compiled part, not a JIT build or the checkout's
    assert f"sources {venv}" in result, result  # a first-use build would take the wheel's sources


@pytest.mark.parametrize(
    "tag, clash",
    [
        ("abi=stable;torch=2.14.1;min_torch=2.10", None),
        ("abi=stable;torch=2.14.1;min_torch=99.0", "stable ABI for torch >= 99.0"),
        ("abi=unstable;torch=2.0.0", "was built for torch 2.0.0"),
    ],
)
def test_build_tag_mismatch_is_refused_before_loading(tmp_path, tag, clash):
    from convit_kernels import extension_loader

    fake = tmp_path / "_C_fake.so"
    fake.write_bytes(b"\x7fELF..." + f"CONVIT_KERNELS_BUILD_TAG{{{tag}}}".encode() + b"\0...")
    problem = extension_loader._mismatch("convit_kernels._C_fake", str(fake))
    if clash is None:
        assert problem is None
    else:
        assert clash in problem and "this is torch" in problem, problem
