"""`convit-kernels aot`: compile the Triton GPSA kernels for sm_80 / sm_90 without a GPU and report resources.

Each kernel of ``triton_gpsa.KERNELS`` is compiled with ``triton.compile`` for an
explicit ``GPUTarget("cuda", arch, 32)``, in each input dtype and for ConViT's
head dims (48 and 64), with each fixed configuration of ``triton_gpsa.FIXED_CONFIGS``
in each key path it runs (``keys=tile``: the whole key row in one BLOCK_N tile,
N = 196 for a "tile" configuration; ``keys=loop``: several key blocks) and the
argument specialisation the runtime would apply to inputs
taken from the qk / v projections (16-byte aligned pointers, strides divisible
by 16, unit stride along d). ``cuobjdump`` (shipped in
``triton/backends/nvidia/bin``) reads the cubin's registers per thread, local
memory (spills), shared memory, and the SASS's tensor-core instructions
(HMMA: sm_80 mma.sync; HGMMA: sm_90 warpgroup wgmma). The exit status is 1 when
a kernel fails to compile or spills.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

__all__ = ["main", "compile_report", "KernelReport"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIMS = (48, 64)
# Per-SM limits: registers (32-bit), shared memory usable by blocks, resident warps.
SM_LIMITS = {80: (65536, 164 * 1024, 64), 90: (65536, 228 * 1024, 64)}
# Scalar arguments (besides the strides): fp32 ones and i32 ones; every other argument is a pointer.
FLOAT_ARGS = {"qk_scale", "scale"}
INT_ARGS = {"H", "N", "grid_w", "grid_h", "partials_per_head"}
# Pointers to the saved state and the tables: always fp32, whatever the input dtype.
FP32_POINTERS = {"PX", "PY", "GATE", "LSE", "DELTA_C", "DELTA_P", "GATE_PARTIAL", "DW_PARTIAL"}


@dataclass
class KernelReport:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    num_warps: int
    config: str = "loop"  # which fixed configuration: "tile" or "loop"
    key_path: str = "loop"  # which code it runs: ONE_KEY_BLOCK ("tile") or not
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    mma: str = "none"
    error: str = ""

    def blocks_per_sm(self) -> int:
        regs, smem, warps = SM_LIMITS[self.arch]
        by_regs = regs // max(1, self.registers * 32 * self.num_warps)
        by_smem = smem // self.shared_bytes if self.shared_bytes else warps
        return min(by_regs, by_smem, warps // self.num_warps)

    def line(self) -> str:
        head = (
            f"{self.kernel:<8} config={self.config:<4} keys={self.key_path:<4} sm_{self.arch} {self.dtype:<4} "
            f"d={self.head_dim:<3} "
            f"warps={self.num_warps}"
        )
        if self.error:
            return f"{head}  COMPILE FAILED: {self.error}"
        occupancy = self.blocks_per_sm() * self.num_warps
        return (
            f"{head}  regs={self.registers:<3} spill={self.spill_bytes:<4} smem={self.shared_bytes:<6} "
            f"mma={self.mma:<5} blocks/SM={self.blocks_per_sm()} warps/SM={occupancy}"
        )


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _launch_spec(jit_fn, dtype, head_dim, config, one_key_block):
    """(signature, constexprs, attrs) of one launch, specialised as the runtime does for projection views."""
    from .backends import triton_gpsa as tg

    elem = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    head_dim, block_d = tg._head_dims(head_dim)
    constexprs = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "DOT_DTYPE": tg.dot_dtype(dtype),
        "USE_ATOMICS": False,
        "ONE_KEY_BLOCK": one_key_block,
        **config,
    }
    signature, attrs = {}, {}
    for index, name in enumerate(jit_fn.arg_names):
        if jit_fn.params[index].is_constexpr:
            signature[name] = "constexpr"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name in INT_ARGS:
            signature[name] = "i32"
        elif name.startswith("stride_") and name.endswith("d"):
            signature[name], constexprs[name] = "constexpr", 1  # unit stride along d: vector loads
        elif name.startswith("stride_"):
            signature[name], attrs[(index,)] = "i32", [["tt.divisibility", 16]]
        else:
            signature[name] = "*fp32" if name in FP32_POINTERS else f"*{elem}"
            attrs[(index,)] = [["tt.divisibility", 16]]
    constexprs = {k: v for k, v in constexprs.items() if k in signature}
    return signature, constexprs, attrs


def _key_paths(jit_fn, config_name):
    """The key paths a fixed configuration runs: a "tile" one only N <= BLOCK_N; a "loop" one both
    (N <= BLOCK_N takes the one-tile code with the loop's tiles), where the kernel has the two."""
    if "ONE_KEY_BLOCK" not in jit_fn.arg_names:
        return ("loop",)
    return ("tile",) if config_name == "tile" else ("loop", "tile")


def _inspect(compiled, report: KernelReport) -> None:
    """Fill the report from the cubin (registers, spills, static shared memory, SASS) and Triton's metadata."""
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout

    def field(key):
        match = re.search(rf"\b{key}:(\d+)", usage.stdout)
        return int(match.group(1)) if match else 0

    # ptxas puts spilled registers in the stack frame (STACK); LOCAL counts other local arrays.
    report.registers, report.spill_bytes = field("REG"), field("STACK") + field("LOCAL")
    report.shared_bytes = field("SHARED") + compiled.metadata.shared  # static + Triton's dynamic allocation
    report.mma = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "none"


def compile_report(archs=(80, 90), dtypes=tuple(DTYPES), head_dims=HEAD_DIMS):
    """Compile every kernel for every arch, dtype and head dim; yield one KernelReport each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from .backends import triton_gpsa as tg

    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for kernel_name, kernel in tg.KERNELS.items():
            jit_fn = kernel
            while not isinstance(jit_fn, JITFunction):  # unwrap triton.autotune and triton.heuristics
                jit_fn = jit_fn.fn
            for dtype_name, (config_name, configs), head_dim in itertools.product(
                dtypes, tg.FIXED_CONFIGS[kernel_name].items(), head_dims
            ):
                config = configs.get(DTYPES[dtype_name].itemsize)
                if config is None:  # no configuration of this kind for this dtype
                    continue
                for key_path in _key_paths(jit_fn, config_name):
                    report = KernelReport(
                        kernel_name, arch, dtype_name, head_dim, config.num_warps, config_name, key_path
                    )
                    signature, constexprs, attrs = _launch_spec(
                        jit_fn, DTYPES[dtype_name], head_dim, dict(config.kwargs), key_path == "tile"
                    )
                    try:
                        compiled = triton.compile(
                            ASTSource(jit_fn, signature, constexprs, attrs),
                            target=target,
                            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                        )
                        _inspect(compiled, report)
                    except Exception as exc:  # reported, and the exit status says so
                        report.error = (str(exc).strip().splitlines() or [repr(exc)])[-1][:300]
                    yield report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="convit-kernels aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SM_LIMITS))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    args = parser.parse_args(argv)

    from .backends import triton_gpsa as tg

    if tg.INTERPRET:  # the kernels were decorated as interpreted functions: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "convit_kernels", "aot", *argv], env=env)

    failed = 0
    for report in compile_report(args.arch, args.dtype, args.head_dim):
        print(report.line(), flush=True)
        failed += bool(report.error or report.spill_bytes)
    if failed:
        print(f"{failed} kernel build(s) failed or spilled", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
