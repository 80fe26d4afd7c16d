"""The rooms' import contract (pyproject.toml, ``[tool.importlinter]``) holds: broker imports none of
the rooms above it, gateway and scheduler never import stages, stages never import gateway, and the
scheduler runs without torch."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lint_imports_keeps_every_contract():
    exe = shutil.which("lint-imports")
    assert exe is not None, "import-linter is a test dependency (pip install -e '.[test]')"
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_the_room_links_point_at_the_four_folders():
    for room in ("broker", "stages", "gateway", "scheduler"):
        link = ROOT / "parallax" / room
        assert link.is_symlink() and link.resolve() == (ROOT / room).resolve(), link
