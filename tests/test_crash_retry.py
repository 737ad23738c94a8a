"""The suite's crash retry (conftest `_RetryCrashedWorker`): a test whose xdist worker dies is run
once more in a fresh worker; a second death, or any ordinary failure, still fails the run."""

import shutil
import subprocess
import sys
from pathlib import Path

PROBE = '''
import os, signal
from pathlib import Path

def test_dies_once():
    flag = Path(__file__).with_name("died_once")
    if not flag.exists():
        flag.touch()
        os.kill(os.getpid(), signal.SIGSEGV)

def test_dies_every_time():
    os.kill(os.getpid(), signal.SIGSEGV)

def test_fails_normally():
    assert 1 == 2
'''


def test_a_dead_worker_is_retried_once_and_only_a_dead_worker(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "-rA",
         "-o", "addopts=", "test_probe.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = run.stdout
    assert run.returncode == 1, out
    assert "PASSED test_probe.py::test_dies_once" in out
    assert "FAILED test_probe.py::test_dies_every_time" in out
    assert "FAILED test_probe.py::test_fails_normally" in out
    # two retries: test_dies_once's first death and test_dies_every_time's first; none for the assert
    assert "2 failed, 1 passed, 2 rerun" in out, out
