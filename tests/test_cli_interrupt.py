"""Ctrl-C at any moment of `convit-kernels` (the console script) is one line, "interrupted", and status 130.

The console script runs convit_kernels_launcher.main, which guards the import of the package (torch)
too; `python -m convit_kernels` guards what follows the package's import. A meta path hook raises
KeyboardInterrupt exactly where a Ctrl-C could come; one test sends a real SIGINT while torch imports.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # this checkout, whatever is installed

# Raises KeyboardInterrupt as the import of the module named by argv[1] starts, as a Ctrl-C then would.
INTERRUPT_AT_IMPORT = """
import sys
INTERRUPTED_MODULE = sys.argv[1]
class InterruptAtImport:
    def find_spec(self, name, path=None, target=None):
        if name == INTERRUPTED_MODULE:
            raise KeyboardInterrupt
sys.meta_path.insert(0, InterruptAtImport())
"""
CONSOLE_SCRIPT = "sys.argv = ['convit-kernels', 'backends']\nfrom convit_kernels_launcher import main\nsys.exit(main())"
PYTHON_M = (
    "import runpy\nsys.argv = ['convit_kernels', 'backends']\nrunpy.run_module('convit_kernels', run_name='__main__')"
)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "module",
    ["convit_kernels", "torch", "convit_kernels.cli", "convit_kernels.backends_report"],
    ids=["the package", "torch, while the package imports", "the command line", "the command"],
)
def test_the_console_script_interrupted_while_importing_prints_one_line(module):
    result = _run(INTERRUPT_AT_IMPORT + CONSOLE_SCRIPT, module)
    assert (result.returncode, result.stderr, result.stdout) == (130, "interrupted\n", ""), result.stderr


def test_python_m_interrupted_after_the_package_import_prints_one_line():
    result = _run(INTERRUPT_AT_IMPORT + PYTHON_M, "convit_kernels.backends_report")
    assert (result.returncode, result.stderr, result.stdout) == (130, "interrupted\n", ""), result.stderr


def test_a_sigint_while_torch_imports_prints_one_line():
    code = "import sys\nprint('started', flush=True)\n" + CONSOLE_SCRIPT
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "started\n"  # Python's own SIGINT handler is in place by now
    time.sleep(0.3)  # into the import of torch (seconds)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    if process.returncode == 0:  # finished before the signal (a very fast machine): nothing to check
        pytest.skip("the command finished before the SIGINT came")
    assert (process.returncode, stderr) == (130, "interrupted\n"), stderr
