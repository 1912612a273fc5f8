"""The `keras-moe` console script."""

import subprocess
import sys

import keras_moe
from keras_moe import cli


def test_version_and_info_report_the_installation(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == keras_moe.__version__
    assert cli.main(["info"]) == 0  # .ci/run installs the default data set
    out = capsys.readouterr().out
    assert "keras-moe " + keras_moe.__version__ in out
    assert "fashion-mnist" in out


def test_no_command_prints_help_and_fails():
    result = subprocess.run([sys.executable, "-m", "keras_moe.cli"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: keras-moe" in result.stdout
