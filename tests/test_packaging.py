"""The package as a user installs it: a wheel carries the recipes and benchmark suites.

The slow test builds a wheel from a copy of the sources, installs it into a fresh
virtual environment (`--system-site-packages`, so TensorFlow is not downloaded again;
the test checks that the environment imports the wheel's keras_moe, not this checkout
or an editable install), and runs the README's main job at a tiny size from an
unrelated folder. Installed from a wheel, `keras-moe train` used to fail with
"'sparse_moe_fashion_mnist' is neither a zoo model nor a recipe".
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from keras_moe import benchmarking, recipes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package_and_maps_the_zoo_and_benchmarks():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "keras_moe").rglob("__init__.py")}
    mapped = config["package-dir"]
    assert mapped == {"keras_moe._zoo_files": "zoo", "keras_moe._benchmark_suites": "benchmarks"}
    assert set(config["packages"]) == on_disk | set(mapped)
    # What the shipped folders must hold: every recipe, every suite.
    assert {p.stem for p in (ROOT / "zoo").glob("*.toml")} == set(recipes.list_recipes())
    assert {p.stem for p in (ROOT / "benchmarks").glob("*.py")} == set(benchmarking.SUITES)


def _environment():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_MOE_RECIPES")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _run(args, cwd, timeout=600):
    result = subprocess.run(args, cwd=cwd, env=_environment(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_runs_the_main_job(tmp_path):
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("keras_moe", "zoo", "benchmarks"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("keras_moe-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
          str(tmp_path / "venv")], cwd=tmp_path)
    python = tmp_path / "venv" / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import keras_moe; print(keras_moe.__file__)"],
                 cwd=elsewhere).strip()
    assert where.startswith(str(tmp_path / "venv")), where  # the wheel's, not a checkout's
    shipped = _run([str(python), "-c", (
        "from keras_moe import benchmarking, recipes\n"
        "print(recipes.recipe_dir()); print(benchmarking.suite_dir())\n"
        "print(len(recipes.list_recipes()), "
        "all((benchmarking.suite_dir() / (s + '.py')).is_file() for s in benchmarking.SUITES))")],
        cwd=elsewhere).split()
    assert shipped[0].startswith(str(tmp_path / "venv")) and shipped[0].endswith("_zoo_files")
    assert shipped[1].endswith("_benchmark_suites")
    assert shipped[2:] == [str(len(recipes.list_recipes())), "True"]

    keras_moe = str(tmp_path / "venv" / "bin" / "keras-moe")
    printed = _run([keras_moe, "train", "--train-size", "256", "--test-size", "64",
                    "--epochs", "1", "--classify", "2", "--verbose", "0", "--out", "run"],
                   cwd=elsewhere)
    assert "model sparse_moe_classifier (recipe sparse_moe_fashion_mnist)" in printed
    assert "served by TensorFlow alone (keras_moe imported: False)" in printed
    assert (elsewhere / "run" / "report.json").exists()
    assert (elsewhere / "run" / "saved_model" / "saved_model.pb").exists()
