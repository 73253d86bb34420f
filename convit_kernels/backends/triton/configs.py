"""Tile configurations of the Triton kernels: fixed ones (no spills on sm_80 / sm_90), autotuning, interpreter.

docs/design.md ("Triton kernels") says why each shape; `convit-kernels aot` reports their resources.
"""

from __future__ import annotations

import triton

__all__ = ["INTERPRET", "MAX_HEAD_DIM", "FIXED_CONFIGS", "INTERPRETER_CONFIGS", "TUNING_SPACE", "fixed_config", "tuned"]

# Read once, as triton.jit reads it when decorating the kernels: the one reading of TRITON_INTERPRET.
INTERPRET = bool(triton.knobs.runtime.interpret)
MAX_HEAD_DIM = 128


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# The fixed configurations, by kernel and input element size (2: fp16 / bf16, 4: fp32). BLOCK_M
# is the query block, BLOCK_N the key block, for every kernel (dk/dv owns BLOCK_N keys and walks
# BLOCK_M queries a step; dq and the forward own BLOCK_M queries and walk BLOCK_N keys). 16-bit
# tiles are 64 rows per warpgroup (wgmma's M) on the operand each warp owns. fp32 tiles are
# small: fp32 dot operands held in registers take twice the room of 16-bit ones (and 3xTF32
# reads a high and a low part of each), so these are the largest that compile without spills;
# `convit-kernels aot --fp32-precision highest` / `high` reports both precisions. fp32 dk/dv owns 16 keys
# and walks 32 queries: its 16 x 32 tiles spilled 96-112 B under triton 3.6 (none under 3.8).
FIXED_CONFIGS = {
    "fwd": {2: _config(128, 64, 8, 3), 4: _config(16, 32, 4, 1)},
    "bwd_pre": {2: _config(128, 16, 4, 1), 4: _config(128, 16, 4, 1)},
    "bwd_dkdv": {2: _config(32, 128, 8, 2), 4: _config(32, 16, 4, 1)},
    "bwd_dq": {2: _config(128, 32, 8, 2), 4: _config(16, 32, 4, 1)},
}
# The interpreter's cost is per program and loop step, nearly independent of the tile: few,
# large tiles. 64-wide key and query steps give N = 196 three full steps and a partial one,
# N <= 64 a partial one only.
INTERPRETER_CONFIGS = {
    "fwd": _config(64, 64, 4, 1),
    "bwd_pre": _config(64, 16, 4, 1),
    "bwd_dkdv": _config(64, 64, 4, 1),
    "bwd_dq": _config(64, 64, 4, 1),
}
# Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) of the 16-bit kernels; fp32
# runs its fixed configuration.
TUNING_SPACE = {
    "fwd": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    "bwd_pre": [],
    "bwd_dkdv": [(32, 128, 8, 2), (32, 64, 4, 3), (64, 128, 8, 2)],
    "bwd_dq": [(128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2)],
}


def fixed_config(kernel_name: str, element_size: int) -> triton.Config:
    """The configuration a kernel runs without autotuning (and under the interpreter, its own)."""
    if INTERPRET:
        return INTERPRETER_CONFIGS[kernel_name]
    return FIXED_CONFIGS[kernel_name][element_size]


def tuned(kernel_name):
    """triton.autotune over the kernel's space, keyed on (N, HEAD_DIM, ARCH) and the dtypes of the arguments.

    fp32 inputs keep their fixed configuration (the 16-bit tiles spill with fp32 operands);
    16-bit ones drop tiles wider than N needs.
    """
    space = [_config(*c) for c in TUNING_SPACE[kernel_name]]
    fp32 = FIXED_CONFIGS[kernel_name][4]

    def prune(configs, named_args, **kwargs):
        if named_args["Q"].element_size() == 4:
            return [fp32]
        cap = max(64, triton.next_power_of_2(named_args["N"]))
        return [c for c in space if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= cap] or space[:1]

    return triton.autotune(
        configs=space + [fp32], key=["N", "HEAD_DIM", "ARCH"], prune_configs_by={"early_config_prune": prune}
    )
