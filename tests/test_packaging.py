"""The wheel a user installs holds every module and every Hydra config of the checkout, and builds cleanly."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_module_and_config_without_build_warnings(tmp_path):
    # Built from a copy, so that the checkout gets no build/ or egg-info folders from a parallel test run.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("unclip", "conf"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    log = build.stdout + build.stderr
    # setuptools warns about folders it would leave out, and about metadata it will stop accepting.
    assert "BuildBackendWarning" not in log and "SetuptoolsDeprecationWarning" not in log, log[-3000:]

    (wheel,) = tmp_path.glob("unclip-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "unclip").rglob("*.py")}
    configs = (REPO / "conf").rglob("*.yaml")
    expected |= {"unclip/conf/" + p.relative_to(REPO / "conf").as_posix() for p in configs}
    assert expected - shipped == set()
