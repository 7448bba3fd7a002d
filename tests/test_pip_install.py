"""`pip install .` (not editable) into a fresh virtual environment, then the installed `htsat-hf` command: its
`--help`, and one real run (`htsat-hf detect` on a tiny model folder and a generated WAV), from a directory outside the
source tree, so that the package, its data files and the entry point come from the installed wheel alone.

Offline and quick: the fresh environment sees the dev environment's installed dependencies through a .pth file (one
path line: the dev environment's own .pth files, e.g. its editable htsat_hf, are not read), and pip installs only the
package (`--no-deps --no-build-isolation --no-index`), from a copy of the project so the build leaves nothing in the
tree."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO_ROOT, save_tiny_detector

PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md")


def pip_available() -> str | None:
    """Why pip cannot build and install here, or None."""
    missing = [name for name in ("pip", "setuptools") if importlib.util.find_spec(name) is None]
    if missing:  # found, not imported: importing setuptools here would clash with distutils already loaded
        return f"building needs pip and setuptools in the test environment ({', '.join(missing)} missing)"
    return None


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh virtual environment into which `pip install .` put htsat-hf."""
    reason = pip_available()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("pip_install")
    project = tmp / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(REPO_ROOT / name, project / name)
    shutil.copytree(REPO_ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    environment = tmp / "venv"
    venv.create(environment, with_pip=False, symlinks=os.name != "nt")
    bin_dir = environment / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip())
    (site_packages / "dev-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--no-input", "--disable-pip-version-check", "--quiet", str(project)],
        capture_output=True, text=True, timeout=300, env=clean_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return bin_dir


def clean_env() -> dict[str, str]:
    """This process's environment without PYTHONPATH (the source tree must not be what is imported), offline."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    return dict(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def test_installed_command_help_lists_every_command(installed, tmp_path):
    from htsat_hf.commands.cli import COMMANDS

    command = installed / "htsat-hf"
    assert command.exists(), sorted(p.name for p in installed.iterdir())
    result = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: htsat-hf")
    assert all(f"  {name} " in result.stdout for name in COMMANDS)
    # the installed copy runs, not the source tree: no PYTHONPATH, another directory, and only one path line into
    # the dev environment (its editable install's .pth file is not read)
    package = next(installed.parent.glob("lib*/**/site-packages/htsat_hf"), None) or next(
        installed.parent.glob("Lib/site-packages/htsat_hf"))
    assert (package / "commands" / "cli.py").is_file() and (package / "label_mappings").is_dir()


def test_installed_command_detects_events_in_a_wav(installed, tmp_path):
    model = save_tiny_detector(tmp_path / "model")
    rate = 32000
    tone = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(6 * rate) / rate)
    sf.write(tmp_path / "clip.wav", tone.astype(np.float32), rate)
    out = tmp_path / "events.tsv"
    result = subprocess.run(
        [str(installed / "htsat-hf"), "detect", "clip.wav", "--model", str(model), "--threshold", "0.0",
         "--output", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows[0] == ["filename", "onset", "offset", "event_label", "score"]
    assert len(rows) > 1 and {row[0] for row in rows[1:]} == {"clip.wav"}  # threshold 0: every label is active
    assert {row[3] for row in rows[1:]} == {"tone", "noise", "other"}
    assert "1 files: 1 done" in result.stderr
