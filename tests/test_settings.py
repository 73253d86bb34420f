"""Every variable of the project's own: one module reads it, one rule per kind, one table (docs/settings.md).

Nothing in the package writes the process environment.
"""

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
# Where the project's variables could be read besides the package: its tests, benchmarks, examples and launcher.
# This file is left out: its patterns and fixtures name variables it never reads.
READERS = SOURCES + [
    p
    for pattern in ("tests/**/*.py", "benchmarks/**/*.py", "python/**/*.py", "convit_kernels_launcher.py")
    for p in ROOT.glob(pattern)
    if p.resolve() != pathlib.Path(__file__).resolve()
]
# The project's own variables: declared in settings.py whoever reads them.
PREFIXES = ("CONVIT_KERNELS_", "GPSA_BENCH_")
SWITCHES = sorted(name for name, s in settings.SETTINGS.items() if s.kind == "switch")
CHECKED = sorted(name for name, s in settings.SETTINGS.items() if s.reader == "package")


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


@pytest.mark.parametrize("name", SWITCHES)
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
    read = re.compile(r"(environ|getenv)[^\n]*(" + "|".join(PREFIXES) + ")")
    readers = [
        str(path.relative_to(ROOT)) for path in READERS if path.name != "settings.py" and read.search(path.read_text())
    ]
    writers = []
    for path in SOURCES:
        for line in path.read_text().splitlines():
            if re.search(r"os\.environ\[[^\]]+\]\s*=|os\.environ\.(setdefault|update)|os\.putenv|setenv\(", line):
                writers.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not readers, f"{' or '.join(PREFIXES)}* read outside convit_kernels/settings.py: {readers}"
    assert not writers, f"the process environment is written in: {writers}"


def test_every_variable_is_in_the_settings_table_and_every_used_one_is_declared():
    table = (ROOT / "docs" / "settings.md").read_text()
    for name in settings.SETTINGS:
        assert re.search(rf"^\| `{name}` \|", table, re.MULTILINE), name
    used = set()
    for path in READERS:
        used.update(re.findall(r"(?:" + "|".join(PREFIXES) + r")[A-Z_]*[A-Z]", path.read_text()))
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


@pytest.mark.parametrize("name", CHECKED)
def test_validate_all_refuses_a_bad_value_of_any_variable(monkeypatch, name):
    settings.validate_all()  # this environment's values are good
    monkeypatch.setenv(name, "bogus")
    with pytest.raises(settings.SettingError, match=f"^{name} must be .* got 'bogus'$"):
        settings.validate_all()


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


def test_the_commands_leave_the_tests_and_benchmarks_variables_to_them(monkeypatch):
    for name, setting in settings.SETTINGS.items():
        if setting.reader != "package":
            monkeypatch.setenv(name, "bogus")
    settings.validate_all()


@pytest.mark.parametrize("value, profile", [(None, "ci"), ("", "ci"), ("long", "long"), (" LONG ", "long")])
def test_the_fuzz_profile_is_a_choice(monkeypatch, value, profile):
    if value is None:
        monkeypatch.delenv("CONVIT_KERNELS_FUZZ", raising=False)
    else:
        monkeypatch.setenv("CONVIT_KERNELS_FUZZ", value)
    assert settings.choice("CONVIT_KERNELS_FUZZ") == profile


def test_a_choice_refuses_other_values_in_one_line(monkeypatch):
    monkeypatch.setenv("CONVIT_KERNELS_FUZZ", "1")
    with pytest.raises(settings.SettingError, match="^CONVIT_KERNELS_FUZZ must be ci or long, got '1'$"):
        settings.choice("CONVIT_KERNELS_FUZZ")


def test_a_list_holds_known_names_and_defaults_when_unset_or_empty(monkeypatch):
    known = ("Ti-224", "S-224", "B-384")
    monkeypatch.delenv("GPSA_BENCH_SHAPES", raising=False)
    assert settings.names("GPSA_BENCH_SHAPES", known) == ["Ti-224", "S-224"]
    monkeypatch.setenv("GPSA_BENCH_SHAPES", "  ")
    assert settings.names("GPSA_BENCH_SHAPES", known) == ["Ti-224", "S-224"]
    monkeypatch.setenv("GPSA_BENCH_SHAPES", " B-384  Ti-224 ")
    assert settings.names("GPSA_BENCH_SHAPES", known) == ["B-384", "Ti-224"]
    monkeypatch.setenv("GPSA_BENCH_SHAPES", "Ti-224 ti-384")
    with pytest.raises(settings.SettingError, match="^GPSA_BENCH_SHAPES must list names of .* got 'ti-384'$"):
        settings.names("GPSA_BENCH_SHAPES", known)


def test_each_variable_is_read_as_its_kind():
    with pytest.raises(TypeError, match="CONVIT_KERNELS_FUZZ is a choice, not a switch"):
        settings.enabled("CONVIT_KERNELS_FUZZ")
    with pytest.raises(TypeError, match="CONVIT_KERNELS_NO_BLAS is a switch, not a list"):
        settings.names("CONVIT_KERNELS_NO_BLAS", ())
