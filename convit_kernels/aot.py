"""`convit-kernels aot`: compile the Triton GPSA kernels for sm_80 / sm_90 without a GPU and report their cost.

Each kernel of ``backends.triton.kernels.KERNELS`` is compiled with ``triton.compile`` for an explicit
``GPUTarget("cuda", arch, 32)`` in each dtype and head dim, in its fixed configuration, with the
argument specialisation the runtime applies to projection views (16-byte aligned pointers,
strides divisible by 16, unit stride along d) and the even-tile flags of N (default 196). The
forward is compiled twice: with its GPSA epilogue (``fwd``) and without (``fwd_twin``, plain
attention: the yardstick). From the cubin (``cuobjdump`` of the triton wheel): registers, spills,
shared memory, the tensor-core instruction kind and SASS thread-instructions per score (``loop/sc``
of the main loop, ``prog/sc`` of the whole program; docs/benchmarks.md defines both). Exit status 1 when
a kernel fails to compile or spills; ``compile_report`` is the same from Python.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from .arguments import number
from .backends.triton.configs import MAX_HEAD_DIM
from .convit_shapes import HEAD_DIMS, TOKENS_224

__all__ = ["main", "compile_report", "summarise", "KernelReport", "count_instructions"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Per-SM limits: registers (32-bit), shared memory usable by blocks, resident warps.
SM_LIMITS = {80: (65536, 164 * 1024, 64), 90: (65536, 228 * 1024, 64)}
# The reported kernels: name -> (kernel of kernels.KERNELS, the GPSA constexpr or None).
REPORTED = {
    "fwd": ("fwd", True),
    "fwd_twin": ("fwd", False),
    "bwd_pre": ("bwd_pre", None),
    "bwd_dkdv": ("bwd_dkdv", None),
    "bwd_dq": ("bwd_dq", None),
}
# Scalar arguments (besides the strides): fp32 ones and i32 ones; every other argument is a pointer.
FLOAT_ARGS = {"qk_scale", "scale"}
INT_ARGS = {"H", "N"}
# Pointers that are fp32 whatever the input dtype.
FP32_POINTERS = {"POS", "GATES", "ROW_STATS", "DELTA", "PT_DOUT"}
# The performance targets the report is held to (tests/test_aot.py), sm_90, 16-bit, d = 64.
TARGETS = {"fwd_loop_per_score": 12.0, "fwd_to_twin": 1.3, "bwd_per_score": 50.0}


@dataclass
class KernelReport:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    n: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0
    mma: str = "none"
    precision: str = ""  # fp32 only: the dots' input precision
    kernel_instructions: int = 0
    loop_instructions: int = 0  # 0: no loop holding tensor-core instructions
    loop_per_score: float = 0.0
    program_per_score: float = 0.0
    sass: str = field(default="", repr=False)
    launch: dict = field(default_factory=dict)  # grid, num_warps, num_stages, constexprs
    error: str = ""

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def blocks_per_sm(self) -> int:
        regs, smem, warps = SM_LIMITS[self.arch]
        by_regs = regs // max(1, self.registers * self.threads)
        by_smem = smem // self.shared_bytes if self.shared_bytes else warps
        return min(by_regs, by_smem, warps // self.num_warps)

    def line(self) -> str:
        head = (
            f"{self.kernel:<8} sm_{self.arch} {self.dtype:<4}{'/' + self.precision if self.precision else ''} "
            f"d={self.head_dim:<3} N={self.n:<4} "
            f"{self.block_m:>3}x{self.block_n:<3} w{self.num_warps} s{self.num_stages}"
        )
        if self.error:
            return f"{head}  COMPILE FAILED: {self.error}"
        return (
            f"{head}  regs={self.registers:<3} spill={self.spill_bytes:<4} smem={self.shared_bytes:<6} "
            f"mma={self.mma:<5} blocks/SM={self.blocks_per_sm()} "
            f"loop/sc={self.loop_per_score:6.2f} prog/sc={self.program_per_score:6.2f}"
        )


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# ---------------------------------------------------------------- SASS counting

_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P(?:T|\d+)\s+")


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each SASS instruction, without NOPs and the trap loop after EXIT."""
    out = []
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if not match:
            continue
        body = _PREDICATE.sub("", match.group(2).strip()).split(None, 1)
        if body:
            out.append((int(match.group(1), 16), body[0], body[1] if len(body) > 1 else ""))

    def target(ins):
        hits = re.findall(r"0x([0-9a-f]+)", ins[2]) if ins[1].split(".")[0] == "BRA" else []
        return int(hits[-1], 16) if hits else None

    return [(a, op, ops, target((a, op, ops))) for a, op, ops in out if op != "NOP" and target((a, op, ops)) != a]


def count_instructions(sass: str) -> tuple[int, int, str]:
    """(kernel instructions, main-loop body instructions, MMA kind) of a kernel's SASS.

    The body is the union of the outermost loops (a backward branch to its target) that hold a
    tensor-core instruction; 0 when there is none.
    """
    instrs = _instructions(sass)
    regions = []
    for start, end in sorted((t, a) for a, _, _, t in instrs if t is not None and t < a):
        if regions and start <= regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], end)
        else:
            regions.append([start, end])
    mma = [a for a, op, _, _ in instrs if op.split(".")[0] in ("HMMA", "HGMMA")]
    regions = [r for r in regions if any(r[0] <= a <= r[1] for a in mma)]
    body = sum(1 for a, *_ in instrs if any(r[0] <= a <= r[1] for r in regions))
    kind = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "none"
    return len(instrs), body, kind


def _per_score(report: KernelReport, step: int, rows_owned: int) -> None:
    """Fill loop/sc and prog/sc: a loop iteration covers BLOCK_M x BLOCK_N scores; a program rows_owned x N."""
    report.loop_per_score = report.loop_instructions * report.threads / (report.block_m * report.block_n)
    full_iterations = report.n // step if report.loop_instructions else 0
    executed = report.kernel_instructions - report.loop_instructions + report.loop_instructions * full_iterations
    report.program_per_score = executed * report.threads / (rows_owned * report.n)


# ---------------------------------------------------------------- compiling


def _launch_spec(kernel_name, dtype, head_dim, config, extra, fp32_precision=None):
    """(signature, constexprs, attrs) of one launch, specialised as the runtime does for projection views."""
    from .backends.triton import kernels, launch

    jit_fn = kernels.KERNELS[kernel_name]
    elem = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    head_dim, block_d = launch.head_dims(head_dim)
    constexprs = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        **launch.dot_constexprs(dtype, fp32_precision),
        "ARCH": 0,
        **config,
        **extra,
    }
    signature, attrs = {}, {}
    for index, name in enumerate(jit_fn.arg_names):
        if jit_fn.params[index].is_constexpr:
            signature[name] = "constexpr"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name == "LO_OFFSET":  # B H N d elements: divisible by 16 where d is, as Triton specialises it
            signature[name], attrs[(index,)] = "i32", [["tt.divisibility", 16]]
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


def _inspect(compiled, report: KernelReport) -> None:
    """Fill the report from the cubin (registers, spills, static shared memory, SASS) and Triton's metadata."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        report.sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True
        ).stdout

    def field_of(key):
        match = re.search(rf"\b{key}:(\d+)", usage.stdout)
        return int(match.group(1)) if match else 0

    # ptxas puts spilled registers in the stack frame (STACK); LOCAL counts other local arrays.
    report.registers, report.spill_bytes = field_of("REG"), field_of("STACK") + field_of("LOCAL")
    report.shared_bytes = field_of("SHARED") + compiled.metadata.shared  # static + Triton's dynamic allocation
    report.kernel_instructions, report.loop_instructions, report.mma = count_instructions(report.sass)


def compile_report(
    archs=(80, 90),
    dtypes=tuple(DTYPES),
    head_dims=HEAD_DIMS,
    n=TOKENS_224,
    kernels=tuple(REPORTED),
    fp32_precision=None,
):
    """Compile each reported kernel for each arch, dtype and head dim at row length n; yield a KernelReport each.

    fp32_precision: the fp32 dots' input precision ("tf32x3" or "tf32"); default what
    ``launch.dot_precision`` picks under torch's current matmul precision.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .backends.triton import configs
    from .backends.triton.kernels import EVEN_FLAGS, KERNELS

    for arch, name, dtype_name, head_dim in itertools.product(archs, kernels, dtypes, head_dims):
        kernel_name, gpsa = REPORTED[name]
        config = configs.FIXED_CONFIGS[kernel_name][DTYPES[dtype_name].itemsize]
        bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        extra = {} if gpsa is None else {"GPSA": gpsa}
        rows_owned, step = (bn, bm) if kernel_name == "bwd_dkdv" else (bm, bn)
        if kernel_name in EVEN_FLAGS:
            flag, block = EVEN_FLAGS[kernel_name]
            extra[flag] = n % config.kwargs[block] == 0
        report = KernelReport(name, arch, dtype_name, head_dim, n, bm, bn, config.num_warps, config.num_stages)
        signature, constexprs, attrs = _launch_spec(
            kernel_name, DTYPES[dtype_name], head_dim, dict(config.kwargs), extra, fp32_precision
        )
        if dtype_name == "fp32" and "PRECISION" in constexprs:  # a split operand's TF32 product is 3xTF32
            report.precision = "tf32x3" if constexprs.get("SPLIT") else constexprs["PRECISION"]
        report.launch = {
            "grid": f"(cdiv(N, {rows_owned}), B * H)",
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
            "constexprs": {k: str(v) for k, v in constexprs.items()},
        }
        try:
            compiled = triton.compile(
                ASTSource(KERNELS[kernel_name], signature, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
            _inspect(compiled, report)
            _per_score(report, step, rows_owned)
        except Exception as exc:  # reported, and the exit status says so
            report.error = (str(exc).strip().splitlines() or [repr(exc)])[-1][:300]
        yield report


def summarise(reports) -> list[dict]:
    """Per (arch, dtype, head dim): the forward's whole-program ratio to its twin and the backward sums."""
    by_key = {}
    for r in reports:
        if not r.error:
            by_key.setdefault((r.arch, r.dtype, r.head_dim, r.n), {})[r.kernel] = r
    rows = []
    for (arch, dtype, head_dim, n), kernels in sorted(by_key.items()):
        row = {"arch": arch, "dtype": dtype, "head_dim": head_dim, "n": n}
        if "fwd" in kernels and "fwd_twin" in kernels:
            row["fwd_to_twin"] = kernels["fwd"].program_per_score / kernels["fwd_twin"].program_per_score
        if "bwd_dq" in kernels and "bwd_dkdv" in kernels:
            row["bwd_per_score"] = kernels["bwd_dq"].program_per_score + kernels["bwd_dkdv"].program_per_score
            if "bwd_pre" in kernels:
                row["bwd_with_pre_per_score"] = row["bwd_per_score"] + kernels["bwd_pre"].program_per_score
        rows.append(row)
    return rows


def _summary_line(row: dict) -> str:
    parts = [f"summary  sm_{row['arch']} {row['dtype']:<4} d={row['head_dim']:<3} N={row['n']:<4}"]
    if "fwd_to_twin" in row:
        parts.append(f"fwd/twin={row['fwd_to_twin']:.3f}")
    if "bwd_per_score" in row:
        parts.append(f"dq+dkdv prog/sc={row['bwd_per_score']:.2f}")
    if "bwd_with_pre_per_score" in row:
        parts.append(f"with preprocess={row['bwd_with_pre_per_score']:.2f}")
    return "  ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convit-kernels aot", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SM_LIMITS), help="(default: 80 90)"
    )
    parser.add_argument(
        "--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES), help=f"(default: {' '.join(DTYPES)})"
    )
    parser.add_argument(
        "--head-dim",
        type=number(int, low=1, high=MAX_HEAD_DIM),
        nargs="+",
        default=list(HEAD_DIMS),
        help=f"(default: {' '.join(map(str, HEAD_DIMS))})",
    )
    parser.add_argument(
        "--n",
        type=number(int, low=1, high=2**20),
        default=TOKENS_224,
        help="row length of the per-score figures (default: %(default)s)",
    )
    parser.add_argument(
        "--kernel", nargs="+", default=list(REPORTED), choices=list(REPORTED), help=f"(default: {' '.join(REPORTED)})"
    )
    parser.add_argument(
        "--fp32-precision",
        choices=("highest", "high"),
        help="fp32 dots as under torch.set_float32_matmul_precision(...): 3xTF32 or TF32 (default: this process's)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from .backends.triton import configs

    if configs.INTERPRET:  # the kernels were decorated as interpreted functions: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "convit_kernels", "aot", *argv], env=env)

    failed, reports = 0, []
    fp32_precision = {"highest": "tf32x3", "high": "tf32", None: None}[args.fp32_precision]
    for report in compile_report(args.arch, args.dtype, args.head_dim, args.n, args.kernel, fp32_precision):
        print(report.line(), flush=True)
        reports.append(report)
        failed += bool(report.error or report.spill_bytes)
    for row in summarise(reports):
        print(_summary_line(row))
    if failed:
        print(f"{failed} kernel build(s) failed or spilled", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
