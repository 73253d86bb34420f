"""`convit-kernels aot`: every Triton kernel compiles for sm_80 and sm_90 without a GPU, with no spills.

Compiles into a temporary Triton cache (nothing lands in the repository or the
user's cache). bf16 and fp32 at d = 48 keep it to 26 compilations (~80 s on
two cores); fp16 builds the same code as bf16 and d = 64 the same tiles as 48
(BLOCK_D = 64): the full table is `convit-kernels aot --arch 80 90`.
"""

import re

from convit_kernels import aot
from convit_kernels.backends import triton_gpsa

LINE = re.compile(
    r"(?P<kernel>\w+)\s+config=(?P<config>\w+)\s+keys=(?P<keys>\w+)\s+sm_(?P<arch>\d+) (?P<dtype>\w+)\s+"
    r"d=(?P<d>\d+)\s+warps=\d+\s+regs=(?P<regs>\d+)\s+"
    r"spill=(?P<spill>\d+)\s+smem=(?P<smem>\d+)\s+mma=(?P<mma>\w+)"
)


def test_report_for_sm80_and_sm90_shows_no_spill(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    status = aot.main(["--arch", "80", "90", "--dtype", "bf16", "fp32", "--head-dim", "48"])
    lines = capsys.readouterr().out.splitlines()
    rows = [LINE.match(line) for line in lines]
    assert status == 0 and all(rows), "\n".join(lines)
    seen = {(r["kernel"], r["config"], r["keys"], int(r["arch"]), r["dtype"]) for r in rows}
    expected = {
        (kernel, config, keys, arch, dtype)
        for kernel, configs in triton_gpsa.FIXED_CONFIGS.items()
        for config, by_size in configs.items()
        for keys in (("loop",) if kernel == "bwd_dkdv" else ("tile",) if config == "tile" else ("loop", "tile"))
        for arch in (80, 90)
        for dtype, size in (("bf16", 2), ("fp32", 4))
        if size in by_size
    }
    assert seen == expected and ("fwd", "tile", "tile", 80, "bf16") in seen
    for r in rows:
        assert int(r["spill"]) == 0 and 0 < int(r["regs"]) <= 255
        assert int(r["smem"]) <= aot.SM_LIMITS[int(r["arch"])][1]
        # every kernel runs its tl.dot on the tensor cores (fp32 as 3xTF32)
        assert r["mma"] != "none", r.group(0)


def test_compile_failure_is_reported_with_nonzero_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(aot, "_launch_spec", lambda *args: ({}, {}, {}))  # a signature that cannot compile
    assert aot.main(["--arch", "80", "--dtype", "fp16", "--head-dim", "64"]) == 1
    assert "COMPILE FAILED" in capsys.readouterr().out
