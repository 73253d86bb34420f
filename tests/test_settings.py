"""Every CONVIT_KERNELS_* variable: one module reads it, one rule, one table (docs/settings.md), nothing written."""

import pathlib
import re

import pytest

from convit_kernels import settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [
    p
    for pattern in (
        "convit_kernels/**/*.py",
        "csrc/**/*.py",
        "csrc/**/*.cpp",
        "csrc/**/*.cu",
        "csrc/**/*.h",
        "setup.py",
    )
    for p in ROOT.glob(pattern)
]


@pytest.mark.parametrize("value", ["1", "true", "YES", " on ", "strict"])
def test_true_spellings(monkeypatch, value):
    monkeypatch.setenv("CONVIT_KERNELS_SELF_CHECK", value)
    assert settings.enabled("CONVIT_KERNELS_SELF_CHECK")


@pytest.mark.parametrize("value", ["0", "false", "No", "off", ""])
def test_false_spellings(monkeypatch, value):
    monkeypatch.setenv("CONVIT_KERNELS_NO_FUSED_MIX", value)
    assert not settings.enabled("CONVIT_KERNELS_NO_FUSED_MIX")
    monkeypatch.setenv("CONVIT_KERNELS_SELF_CHECK", value)
    assert settings.self_check_mode() == "off"


@pytest.mark.parametrize("name", sorted(settings.SETTINGS))
def test_unknown_values_are_refused_in_one_line(monkeypatch, name):
    monkeypatch.setenv(name, "maybe")
    with pytest.raises(settings.SettingError, match=f"^{name} must be .* got 'maybe'$"):
        settings.enabled(name)


def test_self_check_modes(monkeypatch):
    for value, mode in (("1", "on"), ("strict", "strict"), ("0", "off")):
        monkeypatch.setenv("CONVIT_KERNELS_SELF_CHECK", value)
        assert settings.self_check_mode() == mode
    monkeypatch.delenv("CONVIT_KERNELS_SELF_CHECK")
    assert settings.self_check_mode() == "on"


def test_only_the_settings_module_reads_them_and_nothing_writes_the_environment():
    readers, writers = [], []
    for path in SOURCES:
        text = path.read_text()
        relative = path.relative_to(ROOT)
        if path.name != "settings.py" and re.search(r"(environ|getenv)[^\n]*CONVIT_KERNELS_", text):
            readers.append(str(relative))
        for line in text.splitlines():
            if re.search(r"os\.environ\[[^\]]+\]\s*=|os\.environ\.(setdefault|update)|os\.putenv|setenv\(", line):
                writers.append(f"{relative}: {line.strip()}")
    assert not readers, f"CONVIT_KERNELS_* read outside convit_kernels/settings.py: {readers}"
    assert not writers, f"the process environment is written in: {writers}"


def test_every_variable_is_in_the_settings_table_and_every_used_one_is_declared():
    table = (ROOT / "docs" / "settings.md").read_text()
    for name in settings.SETTINGS:
        assert re.search(rf"^\| `{name}` \|", table, re.MULTILINE), name
    used = set()
    for path in SOURCES:
        used.update(re.findall(r"CONVIT_KERNELS_[A-Z_]+[A-Z]", path.read_text()))
    build_macros = {  # C++ macros of the build tag, not settings
        n
        for n in used
        if n.startswith(
            ("CONVIT_KERNELS_TORCH_", "CONVIT_KERNELS_TARGET_", "CONVIT_KERNELS_BUILD", "CONVIT_KERNELS_STR")
        )
    }
    assert used - build_macros <= set(settings.SETTINGS), used - build_macros - set(settings.SETTINGS)


def test_a_command_reports_a_bad_value_in_one_line(monkeypatch, capsys):
    from convit_kernels.cli import main

    monkeypatch.setenv("CONVIT_KERNELS_SELF_CHECK", "maybe")
    assert main(["backends"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convit-kernels backends: CONVIT_KERNELS_SELF_CHECK must be") and "\n" not in err


@pytest.mark.parametrize("name", sorted(settings.SETTINGS))
def test_check_all_refuses_a_bad_value_of_any_variable(monkeypatch, name):
    settings.check_all()  # this environment's values are good
    monkeypatch.setenv(name, "bogus")
    with pytest.raises(settings.SettingError, match=f"^{name} must be .* got 'bogus'$"):
        settings.check_all()


def test_a_command_refuses_a_bad_value_at_its_start_not_at_its_first_use(monkeypatch, capsys):
    # The regression: CONVIT_KERNELS_NO_BLAS is read at the cpu backend's first forward, deep in a run.
    from convit_kernels.cli import main

    monkeypatch.setenv("CONVIT_KERNELS_NO_BLAS", "bogus")
    assert main(["backends"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the command did not start
    err = captured.err.strip()
    assert err.startswith("convit-kernels backends: CONVIT_KERNELS_NO_BLAS must be") and "\n" not in err


@pytest.mark.parametrize("value, expected", [("1", False), ("0", False), ("bogus", settings.SettingError)])
def test_the_interpreter_refuses_a_bad_autotune_value_too(monkeypatch, value, expected):
    # The interpreter never autotunes, but a bad value is refused there as anywhere (it was not read at all).
    from convit_kernels.backends.triton import launch

    monkeypatch.setattr(launch, "INTERPRET", True)
    monkeypatch.setenv("CONVIT_KERNELS_TRITON_AUTOTUNE", value)
    if expected is settings.SettingError:
        with pytest.raises(settings.SettingError, match="^CONVIT_KERNELS_TRITON_AUTOTUNE must be"):
            launch.autotune_enabled()
    else:
        assert launch.autotune_enabled() is expected
