"""Every environment variable of the project's own, declared here and read nowhere else, each under its kind's rule.

A switch (every CONVIT_KERNELS_* variable the package reads) is true for ``1``, ``true``, ``yes``,
``on`` and false for ``0``, ``false``, ``no``, ``off`` or the empty string (any case, surrounding
spaces ignored). A choice takes one of its values (same case and space rule), a list a
space-separated list of the names its reader knows; either, unset or empty, takes its default.
Anything else raises :class:`SettingError` with one line naming the variable. Each is read when it
is used (a test or a benchmark may change it between calls); :func:`validate_all` reads the
package's all at once, so that the command line refuses a bad value at its start rather than deep
in a run. None is ever written. The tests' and the benchmarks' variables are declared here too, so
that each variable of the project has one home and one row in docs/settings.md. Variables of other
software (TRITON_INTERPRET, RANK, CUDA_HOME, ...) are read where they are used. ``setup.py`` loads
this module by path (build-time switches), so it imports nothing but the standard library.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "SettingError",
    "Setting",
    "SETTINGS",
    "validate_all",
    "enabled",
    "self_check_mode",
    "choice",
    "names",
]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class SettingError(ValueError):
    """A variable of :data:`SETTINGS` has a value its rule does not accept."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    choices: tuple[str, ...]  # a switch: values beside its true / false spellings; a choice: every value it takes
    meaning: str
    kind: str = "switch"  # "switch", "choice" or "list"
    reader: str = "package"  # "package" (validate_all reads it), "tests" or "benchmarks"


SETTINGS = {
    s.name: s
    for s in (
        Setting(
            "CONVIT_KERNELS_SELF_CHECK",
            "1",
            ("strict",),
            "verify a GPU kernel on its device before backend='auto' trusts it; false trusts it untested, "
            "strict raises instead of falling back",
        ),
        Setting(
            "CONVIT_KERNELS_TRITON_AUTOTUNE",
            "1",
            (),
            "let triton.autotune pick tile shapes; false runs the fixed configuration (bitwise the same in "
            "every process, as under torch.use_deterministic_algorithms)",
        ),
        Setting(
            "CONVIT_KERNELS_NO_FUSED_MIX",
            "0",
            (),
            "run the sdpa backend's positional mix as torch contractions instead of the fused C++ pass",
        ),
        Setting("CONVIT_KERNELS_NO_BLAS", "0", (), "the cpu backend's tile products without BLAS (portable loops)"),
        Setting("CONVIT_KERNELS_NO_CUDA", "0", (), "build time: do not build the extension's CUDA part"),
        Setting(
            "CONVIT_KERNELS_FUZZ",
            "ci",
            ("ci", "long"),
            "tests/test_fuzz.py's profile: ci, the same examples every run (about a minute on 2 cores), or "
            "long, a longer random search",
            kind="choice",
            reader="tests",
        ),
        Setting(
            "GPSA_BENCH_SHAPES",
            "Ti-224 S-224",
            (),
            "the shapes of the pytest-benchmark suite (benchmarks/test_gpsa.py), names of `convit-kernels bench "
            "--shapes`",
            kind="list",
            reader="benchmarks",
        ),
        Setting(
            "GPSA_BENCH_DTYPES",
            "fp32",
            (),
            "the dtypes of the pytest-benchmark suite, names of `convit-kernels bench --dtypes`",
            kind="list",
            reader="benchmarks",
        ),
    )
}


def _declared(name: str, kind: str) -> Setting:
    setting = SETTINGS[name]
    if setting.kind != kind:
        raise TypeError(f"{name} is a {setting.kind}, not a {kind}")
    return setting


def _either(values: Iterable[str]) -> str:
    *others, last = values
    return f"{', '.join(others)} or {last}" if others else last


def _value(name: str) -> str:
    setting = _declared(name, "switch")
    value = os.environ.get(name, setting.default).strip().lower()
    if value in _TRUE or value in _FALSE or value in setting.choices:
        return value
    spellings = _either(("1", "0") + setting.choices)
    raise SettingError(f"{name} must be {spellings} (or true/false, yes/no, on/off), got {value!r}")


def enabled(name: str) -> bool:
    """The switch ``name`` (a key of :data:`SETTINGS`) under the one rule; a non-switch value counts as true."""
    return _value(name) not in _FALSE


def self_check_mode() -> str:
    """ "on", "off" or "strict", from CONVIT_KERNELS_SELF_CHECK."""
    value = _value("CONVIT_KERNELS_SELF_CHECK")
    if value == "strict":
        return "strict"
    return "off" if value in _FALSE else "on"


def choice(name: str) -> str:
    """The value of the choice ``name``: one of its ``choices``, its default when unset or empty."""
    setting = _declared(name, "choice")
    value = os.environ.get(name, "").strip().lower() or setting.default
    if value not in setting.choices:
        raise SettingError(f"{name} must be {_either(setting.choices)}, got {value!r}")
    return value


def names(name: str, known: Iterable[str]) -> list[str]:
    """The names the list ``name`` holds, each one of ``known``; its default when unset or empty."""
    setting, known = _declared(name, "list"), list(known)
    listed = os.environ.get(name, "").split() or setting.default.split()
    for entry in listed:
        if entry not in known:
            raise SettingError(f"{name} must list names of {', '.join(known)}, got {entry!r}")
    return listed


def validate_all() -> None:
    """Raise :class:`SettingError` (one line) for the first of the package's variables of a value its rule refuses."""
    for name, setting in SETTINGS.items():
        if setting.reader == "package":  # the tests' and the benchmarks' own are validated where those read them
            _value(name)
