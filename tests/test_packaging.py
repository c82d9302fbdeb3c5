"""`pip install .` makes the package, the model and the driver importable from any folder: the wheel built from
the tracked files holds every module of the project (and its package data), and, installed into a folder of its
own, imports from elsewhere without this checkout on the path."""

import os
import subprocess
import sys
import zipfile

from conftest import REPO_ROOT


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout
    return [name for name in listed.splitlines() if (REPO_ROOT / name).is_file()]


def test_the_wheel_holds_the_project_and_imports_from_anywhere(tmp_path):
    source = tmp_path / "source"  # a copy of the tracked files: building writes build/ and *.egg-info beside them
    for name in tracked_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO_ROOT / name).read_bytes())
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True)
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"modeling_llama_patch.py", "run_clm.py"} | {
        path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "patch_training").rglob("*")
        if path.is_file() and path.suffix in (".py", ".json", ".txt") and "__pycache__" not in path.parts}
    assert expected <= names, f"the wheel lacks {sorted(expected - names)}"

    installed = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(installed), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import modeling_llama_patch, run_clm, patch_training.loss, patch_training.run_dir; "
            "print(modeling_llama_patch.__file__, run_clm.__file__)")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(path.startswith(str(installed)) for path in result.stdout.split()), result.stdout
