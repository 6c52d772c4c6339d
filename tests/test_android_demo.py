"""The Android demo's Java sources compile against the real ExecuTorch and ONNX Runtime Java APIs.

The check downloads two pinned npm packages on its first run (about 190 MB) and caches the extracted jars, so a
warm run takes seconds. javac and npm must be installed; a missing tool fails the test instead of skipping it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECK_SCRIPT = REPO_ROOT / "android_demo" / "check" / "compile_check.py"
APP_SRC = REPO_ROOT / "android_demo" / "app" / "src" / "main"


def run_check(*arguments: str) -> subprocess.CompletedProcess[str]:
    for tool in ("javac", "javap", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found on PATH; the Android compile check needs a JDK and npm installed")
    return subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), *arguments],
        capture_output=True,
        text=True,
        timeout=1800,
    )


def copy_app_sources(tmp_path: Path) -> Path:
    copy = tmp_path / "main"
    shutil.copytree(APP_SRC, copy)
    return copy


def test_compile_check_passes() -> None:
    result = run_check()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK: compiled" in result.stdout, output


def test_compile_check_rejects_unknown_api(tmp_path: Path) -> None:
    app_src = copy_app_sources(tmp_path)
    source = app_src / "java" / "org" / "g3nexport" / "demo" / "ExecuTorchGenerator.java"
    text = source.read_text(encoding="utf-8")
    assert "module.load();" in text
    # LlmModule has no loadProgram(), so only a check that compiles against the real jar fails here.
    source.write_text(text.replace("module.load();", "module.loadProgram();"), encoding="utf-8")

    result = run_check("--app-src", str(app_src))

    assert result.returncode == 1, result.stdout + result.stderr
    assert "ExecuTorchGenerator.java" in result.stderr
    assert "loadProgram" in result.stderr


def test_compile_check_rejects_missing_view_id(tmp_path: Path) -> None:
    app_src = copy_app_sources(tmp_path)
    layout = app_src / "res" / "layout" / "activity_main.xml"
    text = layout.read_text(encoding="utf-8")
    assert '@+id/stop_button' in text
    layout.write_text(text.replace("@+id/stop_button", "@+id/cancel_button"), encoding="utf-8")

    result = run_check("--app-src", str(app_src))

    assert result.returncode == 1, result.stdout + result.stderr
    assert "MainActivity.java" in result.stderr
    assert "stop_button" in result.stderr
