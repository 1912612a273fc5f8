"""What the study tests share: running `examples/study.py` and reading its rows.

Importing this puts `examples/` on `sys.path`, as `python3 examples/study.py` has it,
so that the tests import `studies` as the script does.
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
STUDY_SCRIPT = REPO / "examples" / "study.py"
if str(REPO / "examples") not in sys.path:
    sys.path.insert(0, str(REPO / "examples"))


def run_study(*args, timeout=300):
    """`python3 examples/study.py ARGS` in a fresh process; fails the test unless it
    exits 0, with its output."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run([sys.executable, str(STUDY_SCRIPT), *map(str, args)],
                               capture_output=True, text=True, timeout=timeout, env=env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


def jsonl_rows(path):
    """The JSON rows of a results file, blank lines skipped."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
