"""The on-device self-check behind backend="auto", on CPU tensors with a fake GPU backend."""

import dataclasses
import json
import os
import sys
import warnings

import pytest
import torch

from convit_kernels import _version, backends, dispatch, gpsa_attention, verdict_cache, verification
from convit_kernels.backends import BackendError
from convit_kernels.backends.sdpa import sdpa_gpsa

from gpsa_cases import make_inputs

CPU = torch.device("cpu")


def _wrong(*args):
    return sdpa_gpsa(*args) * 1.01  # off by 1%: far outside flash-attention's rule


def _broken(*args):
    raise RuntimeError("illegal memory access")


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """CPU tensors treated as a checked device whose auto choice is a stand-in "triton" backend."""
    monkeypatch.setattr(dispatch, "CHECKED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(verification, "device_name", lambda device: "Fake GPU 80GB")
    monkeypatch.setitem(dispatch.AUTO_POLICY, "cpu", (("triton", "sdpa"), "the fake GPU's policy"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CONVIT_KERNELS_SELF_CHECK", raising=False)
    monkeypatch.setattr(verification, "_VERDICTS", {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    real = backends.get_backend("triton")

    def install(attention):
        fake = dataclasses.replace(
            real,
            devices=None,
            forward=None,
            backward=None,
            double_backward=None,
            attention=attention,
            unavailable=lambda: None,
        )
        monkeypatch.setitem(backends._BACKENDS, "triton", fake)

    return install


def _inputs():
    return [t.detach() for t in make_inputs(2, 3, 16, 8)]


def test_a_wrong_backend_falls_back_to_sdpa_and_warns_once(fake_gpu):
    fake_gpu(_wrong)
    inputs = _inputs()
    with pytest.warns(RuntimeWarning, match=r"backend 'triton' disagrees .* uses 'sdpa' for this combination") as w:
        out = gpsa_attention(*inputs)
    assert "Fake GPU 80GB" in str(w[0].message) and "d=8 N=16" in str(w[0].message)
    torch.testing.assert_close(out, gpsa_attention(*inputs, backend="sdpa"), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpsa_attention(*inputs)  # the verdict is kept: no check, no second warning
    (verdict,) = verification.verdicts().values()
    assert not verdict.passed and verdict.detail.startswith("out: max error") and verdict.source == "this process"


def test_a_backend_that_raises_falls_back_too(fake_gpu):
    fake_gpu(_broken)
    with pytest.warns(RuntimeWarning, match="raised RuntimeError: illegal memory access"):
        gpsa_attention(*_inputs())


def test_strict_mode_raises(fake_gpu, monkeypatch):
    fake_gpu(_wrong)
    monkeypatch.setenv("CONVIT_KERNELS_SELF_CHECK", "strict")
    with pytest.raises(BackendError, match="backend 'triton' disagrees with the float64 reference"):
        gpsa_attention(*_inputs())


def test_off_trusts_the_kernels(fake_gpu, monkeypatch):
    fake_gpu(_wrong)
    monkeypatch.setenv("CONVIT_KERNELS_SELF_CHECK", "0")
    inputs = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gpsa_attention(*inputs)
    torch.testing.assert_close(out, _wrong(*inputs, (4, 4), 8**-0.5))
    assert not verification.verdicts()


def test_bad_mode_is_a_clear_error(fake_gpu, monkeypatch):
    fake_gpu(sdpa_gpsa)
    monkeypatch.setenv("CONVIT_KERNELS_SELF_CHECK", "maybe")
    with pytest.raises(ValueError, match="CONVIT_KERNELS_SELF_CHECK must be 1, 0 or strict"):
        gpsa_attention(*_inputs())


def test_a_correct_backend_is_used_without_fallback(fake_gpu, monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return sdpa_gpsa(*args)

    fake_gpu(counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpsa_attention(*_inputs())
        gpsa_attention(*_inputs())
    assert len(calls) == 3  # the check's one call (2 heads), then both calls of the caller (3 heads)
    (verdict,) = verification.verdicts().values()
    assert verdict.passed


def test_explicit_backends_are_not_checked(fake_gpu):
    fake_gpu(_wrong)
    inputs = _inputs()
    torch.testing.assert_close(gpsa_attention(*inputs, backend="triton"), _wrong(*inputs, (4, 4), 8**-0.5))
    assert not verification.verdicts()


def test_stored_verdicts_are_read_instead_of_checking_again(fake_gpu, monkeypatch):
    fake_gpu(_wrong)
    combination = verification.combination("triton", CPU, torch.float32, 8, 16, 4)
    failed = verification.Verdict(False, "out: wrong on this device", "gpu-check")
    path = verification.store_verdicts("Fake GPU 80GB", {combination: failed})
    assert path.endswith("convit_kernels/self-check/Fake_GPU_80GB.json")
    monkeypatch.setattr(verification, "run_check", lambda *a: pytest.fail("checked again despite a stored verdict"))
    with pytest.warns(RuntimeWarning, match="out: wrong on this device"):
        gpsa_attention(*_inputs())
    assert verification.verdicts()[combination].source == path


def test_verdicts_of_another_stack_are_ignored(fake_gpu):
    fake_gpu(sdpa_gpsa)
    combination = verification.combination("triton", CPU, torch.float32, 8, 16, 4)
    path = verification.store_verdicts("Fake GPU 80GB", {combination: verification.Verdict(False, "old", "gpu-check")})
    with open(path) as f:
        content = json.load(f)
    content["stack"]["convit_kernels"] = "0.0.1"
    with open(path, "w") as f:
        json.dump(content, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpsa_attention(*_inputs())  # checked afresh: it passes
    assert verification.verdicts()[combination].source == "this process"


def _corrupt_files():
    """Verdict files of the wrong shape, each as a function of (the current stack, the call's combination key)."""
    return {
        "a list": lambda stack, key: [],
        "null": lambda stack, key: None,
        "verdicts a list": lambda stack, key: {"stack": stack, "verdicts": []},
        "a verdict that is a string": lambda stack, key: {"stack": stack, "verdicts": {key: "passed"}},
        "a verdict without detail": lambda stack, key: {"stack": stack, "verdicts": {key: {"passed": True}}},
        "passed the string false": lambda stack, key: {
            "stack": stack,
            "verdicts": {key: {"passed": "false", "detail": ""}},
        },
        "passed 1": lambda stack, key: {"stack": stack, "verdicts": {key: {"passed": 1, "detail": ""}}},
    }


@pytest.mark.parametrize("corrupt", _corrupt_files().values(), ids=_corrupt_files().keys())
def test_a_corrupt_verdict_file_means_check_again(fake_gpu, corrupt):
    fake_gpu(_wrong)
    key = verification.combination("triton", CPU, torch.float32, 8, 16, 4).key()
    path = verdict_cache.cache_path("Fake GPU 80GB")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump(corrupt(verification._stack(), key), f)
    with pytest.warns(RuntimeWarning, match="disagrees"):  # checked here: it fails and auto falls back
        out = gpsa_attention(*_inputs())
    torch.testing.assert_close(out, gpsa_attention(*_inputs(), backend="sdpa"), rtol=0, atol=0)
    (verdict,) = verification.verdicts().values()
    assert verdict.source == "this process"


def test_a_deeply_nested_verdict_file_means_check_again(fake_gpu):
    fake_gpu(sdpa_gpsa)
    path = verdict_cache.cache_path("Fake GPU 80GB")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpsa_attention(*_inputs())
    (verdict,) = verification.verdicts().values()
    assert verdict.passed and verdict.source == "this process"


def test_an_unwritable_cache_warns_once_and_the_check_still_counts(fake_gpu, monkeypatch, tmp_path):
    fake_gpu(sdpa_gpsa)
    monkeypatch.setattr(dispatch, "STORED_GRIDS", ((3, 4),))
    monkeypatch.setattr(dispatch, "STORED_HEAD_DIMS", (8,))
    (tmp_path / "convit_kernels").write_text("a file where the cache folder goes")
    with pytest.warns(RuntimeWarning, match="could not store the self-check verdicts"):
        found = verification.check_and_store(CPU, dispatch.stored_combinations(CPU))
    assert found and all(v.passed for v in found.values())
    assert verification.store_verdicts("Fake GPU 80GB", found) is None


def test_the_stack_needs_no_triton(fake_gpu, monkeypatch):
    fake_gpu(sdpa_gpsa)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError: the cuda backend's case
    gpsa_attention(*_inputs())
    assert verification._stack()["triton"] is None


def test_check_and_store_round_trip(fake_gpu, monkeypatch):
    fake_gpu(sdpa_gpsa)
    monkeypatch.setattr(dispatch, "STORED_GRIDS", ((3, 4),))
    monkeypatch.setattr(dispatch, "STORED_HEAD_DIMS", (8,))
    found = verification.check_and_store(CPU, dispatch.stored_combinations(CPU))
    assert {c.dtype for c in found} == {"float16", "bfloat16", "float32"} and all(v.passed for v in found.values())
    with open(verdict_cache.cache_path("Fake GPU 80GB")) as f:
        stored = json.load(f)
    assert set(stored["verdicts"]) == {c.key() for c in found}
    assert stored["stack"]["convit_kernels"] == _version.__version__


def test_backends_command_lists_the_checks_of_this_process(fake_gpu, capsys):
    from convit_kernels.cli import main

    fake_gpu(_wrong)
    with pytest.warns(RuntimeWarning):
        gpsa_attention(*_inputs())
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "on-device checks (CONVIT_KERNELS_SELF_CHECK=on):" in out
    assert "Fake GPU 80GB: triton sm_00 float32 d=8 N=16 W=4: FAILED, auto uses sdpa" in out
    # auto's pick for ConViT's shape needs a check of its own, and the report says so before running it
    assert "running the on-device check of triton (triton sm_00 float32 d=48 N=196 W=14)" in out
    assert "float32   -> triton -> sdpa (failed its on-device check)" in out


@pytest.mark.parametrize("command", ["verify-kernels", "self-check"])
def test_verify_kernels_command_without_a_gpu_exits_2(capsys, command):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    from convit_kernels.cli import main

    assert main([command]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "verify-kernels: no CUDA GPU here, nothing to check" and not captured.out


def test_compile_runs_the_check_outside_the_graph(fake_gpu):
    fake_gpu(_wrong)
    torch._dynamo.reset()
    inputs = _inputs()
    compiled = torch.compile(lambda *a: gpsa_attention(*a), fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning, match="disagrees"):
        out = compiled(*inputs)
    torch.testing.assert_close(out, gpsa_attention(*inputs, backend="sdpa"))
