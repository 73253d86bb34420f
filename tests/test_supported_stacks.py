"""The supported range in pyproject.toml is the one CI tests: each lower bound is the oldest version it runs.

.ci/run tests the pinned stack (requirements.txt) and .ci/oldest-stack the oldest core (requirements-oldest.txt,
with the newest Pillow and pytest): a bound is the lower of the two pins.
"""

import os
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    with open(os.path.join(ROOT, name)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                package, version = line.split("==")
                pins[package.lower()] = Version(version)
    return pins


def _bounded_requirements() -> list[Requirement]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    texts = project["build-system"]["requires"] + project["project"]["dependencies"]
    for extra in project["project"]["optional-dependencies"].values():
        texts += extra
    requirements = [Requirement(text) for text in texts]
    return [r for r in requirements if any(s.operator == ">=" for s in r.specifier)]


@pytest.mark.parametrize("requirement", _bounded_requirements(), ids=str)
def test_each_lower_bound_is_the_oldest_version_ci_tests(requirement):
    (bound,) = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    name = requirement.name.lower()
    pins = [stack[name] for stack in (_pins("requirements-oldest.txt"), _pins("requirements.txt")) if name in stack]
    assert pins, f"{name} has a lower bound but CI pins no version of it"
    assert all(pin in requirement.specifier for pin in pins), (requirement, pins)
    assert min(pins).release[: len(bound.release)] == bound.release, (bound, pins)


def test_the_core_packages_have_tested_lower_bounds():
    bounded = {r.name.lower() for r in _bounded_requirements()}
    assert {"torch", "triton", "timm", "torchvision", "pillow", "setuptools"} <= bounded


def test_requires_python_is_a_tested_version():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires_python = tomllib.load(f)["project"]["requires-python"]
    with open(os.path.join(ROOT, ".ci", "oldest-stack")) as f:
        oldest_python = re.search(r"^version=(\S+)$", f.read(), re.MULTILINE).group(1)
    assert requires_python.startswith(">=")
    bound = Version(requires_python[2:])
    assert bound <= Version(oldest_python)  # the pinned stack runs on this machine's Python: at the bound
