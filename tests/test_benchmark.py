"""tools/benchmark.py runs end to end on tiny workloads; its figures are not checked here."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "benchmark.py"


def test_benchmark_quick_run(mini_root):
    environment = {**os.environ, "COCOMIX_DATA": str(mini_root), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True,
                              timeout=600, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]

    output = finished.stdout
    for section in ("== data", "== train", "== metrics", "== extract"):
        assert section in output, output
    # The metrics section asserts itself that its ranks equal the argsort loop's before printing this.
    assert output.count("ranks equal to the reference") == 2, output
    for variant in ("baseline", "lemda", "pairing", "premix", "token_baseline", "tokenmix", "alignaware"):
        assert f"  {variant} " in output, variant
    assert "img/s" in output
    assert "captions/s" in output
