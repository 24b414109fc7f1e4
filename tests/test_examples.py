"""The examples run and do what they say."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_brain_example() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embedded_brain.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "stored: kind=log" in out
    assert "stored: kind=job" in out
