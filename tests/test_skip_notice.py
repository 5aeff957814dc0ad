"""Without Chromium, `make test` says once, at the end, which browser tests did not run and how to get them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_missing_chromium_is_named_at_the_end(tmp_path):
    env = {**os.environ, "PHASELENS_TEST_CHROMIUM": str(tmp_path / "no-chromium")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_dashboard_injection_browser.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "browser tests skipped" in out and "apt-get install -y chromium" in out, out
    tail = out[out.index("browser tests skipped"):]
    assert "tests/test_dashboard_injection_browser.py::" in tail, tail  # each skipped test is named
    assert out.count("browser tests did not run") == 1
