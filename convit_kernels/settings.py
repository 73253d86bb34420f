"""Every CONVIT_KERNELS_* environment variable, read here and nowhere else, with one rule.

A switch is true for ``1``, ``true``, ``yes``, ``on`` and false for ``0``, ``false``, ``no``,
``off`` or the empty string (any case, surrounding spaces ignored); anything else raises
:class:`SettingError` with one line naming the variable. Each is read when it is used (a
test or a benchmark may change it between calls); :func:`check_all` reads them all at once, so
that the command line refuses a bad value at its start rather than deep in a run. None is ever
written. The table of docs/settings.md lists them; this module is loaded by path by ``setup.py``
too (build-time switches), so it imports nothing but the standard library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["SettingError", "Setting", "SETTINGS", "check_all", "enabled", "self_check_mode"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class SettingError(ValueError):
    """A CONVIT_KERNELS_* variable has a value its rule does not accept."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    choices: tuple[str, ...]  # extra values beside the switch's true / false spellings
    meaning: str


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
    )
}


def _value(name: str) -> str:
    setting = SETTINGS[name]
    value = os.environ.get(name, setting.default).strip().lower()
    if value in _TRUE or value in _FALSE or value in setting.choices:
        return value
    *others, last = ("1", "0") + setting.choices
    raise SettingError(f"{name} must be {', '.join(others)} or {last} (or true/false, yes/no, on/off), got {value!r}")


def enabled(name: str) -> bool:
    """The switch ``name`` (a key of :data:`SETTINGS`) under the one rule; a non-switch value counts as true."""
    return _value(name) not in _FALSE


def self_check_mode() -> str:
    """ "on", "off" or "strict", from CONVIT_KERNELS_SELF_CHECK."""
    value = _value("CONVIT_KERNELS_SELF_CHECK")
    if value == "strict":
        return "strict"
    return "off" if value in _FALSE else "on"


def check_all() -> None:
    """Raise :class:`SettingError` (one line) for the first CONVIT_KERNELS_* variable of a value its rule refuses."""
    for name in SETTINGS:
        _value(name)
