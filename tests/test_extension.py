"""The C++/CUDA extension: its ops, what is particular to the "cpu" kernel, and its CUDA build.

The "cpu" and "cuda" backends against the fp64 reference, and through the fused op, are
tests/test_conformance.py's claims.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import warnings

import pytest
import torch

from convit_kernels import available_backends, build_config, settings
from convit_kernels.extension_loader import build_tag, load_cpu, load_cuda, why_not_built

from gpsa_cases import assert_matches_reference, make_inputs


@pytest.fixture(scope="module", autouse=True)
def extension_loaded():
    problem = load_cpu()
    assert problem is None, problem


def test_portable_loops_without_blas(monkeypatch):
    monkeypatch.setenv("CONVIT_KERNELS_NO_BLAS", "1")
    assert_matches_reference(make_inputs(2, 3, 50, 40), backend="cpu", grid_size=(5, 10))
    assert_matches_reference(make_inputs(2, 3, 49, 16, dtype=torch.float64, strided=False), backend="cpu")


def _ext_args(dtype=torch.float32, B=2, H=3, N=12, d=8, grid_w=4):
    q, k, v, w, _, lam = [t.detach() for t in make_inputs(B, H, N, d, dtype=dtype)]
    return q, k, v, w, lam, grid_w, d**-0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_ext_ops(dtype):
    fwd_args = _ext_args(dtype)
    torch.library.opcheck(torch.ops.convit_kernels_ext.gpsa_fwd.default, fwd_args)
    out, stats = torch.ops.convit_kernels_ext.gpsa_fwd(*fwd_args)
    q, k, v, w, lam, grid_w, scale = fwd_args
    grad_out = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2)  # strided
    bwd_args = (grad_out, q, k, v, w, lam, stats, grid_w, scale)
    torch.library.opcheck(torch.ops.convit_kernels_ext.gpsa_bwd.default, bwd_args)


def _run_ext(inputs):
    q, k, v, w, _, lam = inputs
    out, stats = torch.ops.convit_kernels_ext.gpsa_fwd(q, k, v, w, lam, 14, 48**-0.5)
    grad_out = torch.ones_like(out).cumsum(1) / out.shape[1]
    grads = torch.ops.convit_kernels_ext.gpsa_bwd(grad_out, q, k, v, w, lam, stats, 14, 48**-0.5)
    return (out,) + tuple(grads)


def test_deterministic_across_runs_and_thread_counts():
    # 1 thread against 2 or more whatever this process runs with: at 1 thread, "the current count"
    # would compare a single-threaded run with itself.
    inputs = [t.detach() for t in make_inputs(4, 4, 196, 48)]
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (max(2, threads), 1, max(2, threads)):
            torch.set_num_threads(count)
            assert torch.get_num_threads() == count
            runs.append(_run_ext(inputs))
    finally:
        torch.set_num_threads(threads)
    for many, single, again in zip(*runs):
        assert torch.equal(many, single) and torch.equal(many, again)


def _bad(index, value):
    args = list(_ext_args())
    args[index] = value(args[index]) if callable(value) else value
    return args


@pytest.mark.parametrize(
    "args,message",
    [
        (_bad(0, lambda q: q.to(torch.int32)), "q must be float16, bfloat16, float32 or float64"),
        (_bad(0, lambda q: q[0]), "q must have 4 dimensions"),
        (_bad(1, lambda k: k.double()), "k must have the dtype of q"),
        (_bad(2, lambda v: v[:, :2]), "v must have shape"),
        (_bad(3, lambda w: torch.cat([w, w[:1]])), "pos_weight"),
        (_bad(4, lambda lam: lam[:2]), "gating_param"),
        (_bad(5, 5), "grid_w must be a positive divisor"),
    ],
    ids=["int-q", "rank-3-q", "dtype-k", "shape-v", "heads-pos_weight", "heads-gating", "grid_w"],
)
def test_bad_input_raises_clear_error(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.convit_kernels_ext.gpsa_fwd(*args)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_bad_scale_is_refused_by_both_ext_ops(scale):
    q, k, v, w, lam, grid_w, _ = _ext_args()
    out, lse = torch.ops.convit_kernels_ext.gpsa_fwd(q, k, v, w, lam, grid_w, 1.0)
    with pytest.raises(RuntimeError, match="scale must be a finite number > 0"):
        torch.ops.convit_kernels_ext.gpsa_fwd(q, k, v, w, lam, grid_w, scale)
    with pytest.raises(RuntimeError, match="scale must be a finite number > 0"):
        torch.ops.convit_kernels_ext.gpsa_bwd(torch.ones_like(out), q, k, v, w, lam, lse, grid_w, scale)


def test_bad_backward_input_raises_clear_error():
    q, k, v, w, lam, grid_w, scale = _ext_args()
    out, stats = torch.ops.convit_kernels_ext.gpsa_fwd(q, k, v, w, lam, grid_w, scale)
    grad_out = torch.randn_like(out)
    with pytest.raises(RuntimeError, match="stats must be Float"):
        torch.ops.convit_kernels_ext.gpsa_bwd(grad_out, q, k, v, w, lam, stats.double(), grid_w, scale)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.convit_kernels_ext.gpsa_bwd(grad_out[:, :3], q, k, v, w, lam, stats, grid_w, scale)
    with pytest.raises(RuntimeError, match=r"stats \(B x H x N x 2\)"):
        torch.ops.convit_kernels_ext.gpsa_bwd(grad_out, q, k, v, w, lam, stats[:, :2], grid_w, scale)


# ---------------------------------------------------------------- the CUDA part


def _cuda_home():
    if settings.enabled("CONVIT_KERNELS_NO_CUDA") or torch.version.cuda is None:
        return None
    return build_config.find_cuda_home()


def test_cuda_part_built_for_every_architecture():
    home = _cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit here, or CONVIT_KERNELS_NO_CUDA is set")
    # torch has CUDA and nvcc is here: the install must have built the part (a first-use build would hide it).
    spec = importlib.util.find_spec("convit_kernels._C_cuda")
    assert spec is not None, f"the CUDA part was not built at install: {why_not_built('convit_kernels._C_cuda')}"
    assert load_cuda() is None, load_cuda()  # the built part loads, GPU or not
    if not torch.cuda.is_available():
        assert available_backends()["cuda"].reason == "the CUDA part is built, but there is no CUDA device"
    import convit_kernels._C_cuda as cuda_part  # built by `pip install -e .` wherever nvcc is found

    assert torch._C._dispatch_has_kernel_for_dispatch_key("convit_kernels_ext::gpsa_fwd", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("convit_kernels_ext::gpsa_bwd", "CUDA")
    cuobjdump = shutil.which("cuobjdump", path=os.path.join(home, "bin"))
    if cuobjdump is None:
        import triton

        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    listing = subprocess.run([cuobjdump, "--list-elf", cuda_part.__file__], capture_output=True, text=True).stdout
    with warnings.catch_warnings():  # the toolkit's dropped architectures (sm_70 with CUDA 13) were reported at build
        warnings.simplefilter("ignore")
        archs = build_config.cuda_arch_list(home)
    for arch in archs.split(";"):
        assert f"sm_{arch.split('+')[0].replace('.', '')}" in listing, (arch, listing)
    # Every kernel of every architecture fits its registers: no spill to local memory.
    usage = subprocess.run([cuobjdump, "-res-usage", cuda_part.__file__], capture_output=True, text=True).stdout
    resources = [line for line in usage.splitlines() if "REG:" in line]
    assert resources and all("STACK:0 " in line and "LOCAL:0" in line for line in resources), usage


# A mangled C++ name in torch's own namespaces (c10::, at::, torch::): the ABI that changes with every release.
_TORCH_CXX_SYMBOL = re.compile(r"(?<![0-9])(?:3c10|2at|5torch)(?=[0-9])")


@pytest.mark.parametrize("module", ["convit_kernels._C", "convit_kernels._C_cuda"])
def test_built_part_is_on_the_stable_abi(module):
    """Both parts: the stable build tag, an abi3 file, and no undefined symbol of torch's C++ API (only the C shim)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        pytest.skip(f"{module} is not built here")
    tag = build_tag(spec.origin)
    target = ".".join(str(part) for part in build_config.STABLE_ABI_TARGET)
    assert tag is not None and tag.get("abi") == "stable" and tag.get("min_torch") == target, (spec.origin, tag)
    assert spec.origin.endswith(".abi3.so"), spec.origin  # Python's limited API, and no older build shadowing it
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm here (binutils) to list the undefined symbols")
    listing = subprocess.run([nm, "-D", "--undefined-only", spec.origin], capture_output=True, text=True, check=True)
    undefined = [line.split()[-1] for line in listing.stdout.splitlines() if line.strip()]
    assert any(name.startswith(("aoti_torch_", "torch_")) for name in undefined), undefined  # it uses the C shim
    torch_cxx = [name for name in undefined if _TORCH_CXX_SYMBOL.search(name)]
    assert not torch_cxx, f"{module} needs torch C++ symbols: {torch_cxx[:10]}"


@pytest.mark.gpu
def test_cuda_deterministic():
    inputs = [t.detach().cuda() for t in make_inputs(4, 4, 196, 48)]
    first, again = _run_ext(inputs), _run_ext(inputs)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_a_part_whose_install_compile_failed_is_not_built_again_in_each_process(tmp_path, monkeypatch):
    from convit_kernels import extension_loader

    monkeypatch.setattr(extension_loader, "_PACKAGE", str(tmp_path))
    monkeypatch.setattr(extension_loader, "_jit_build", lambda *args: pytest.fail("built again on first use"))
    module = "convit_kernels._C_never_built"
    note = build_config.not_built_note(str(tmp_path), module)
    with open(note, "w") as f:
        f.write("the compile failed: gpsa_cuda.cu(476): error: identifier X is undefined\n")
    problem = extension_loader._load(module, "never_built", cuda=True)
    assert "gpsa_cuda.cu(476): error: identifier X is undefined" in problem and "not built again" in problem
    assert why_not_built(module).startswith("the compile failed: gpsa_cuda.cu(476)")
    os.remove(note)  # no note (an install without a compiler): the first use builds it
    monkeypatch.setattr(extension_loader, "_jit_build", lambda *args: None)
    assert extension_loader._load(module, "never_built", cuda=True) is None
    assert why_not_built(module).startswith("the install left no note")
