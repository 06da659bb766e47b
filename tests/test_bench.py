"""The benchmark runs end to end (tiny loads; figures come from `make bench`, not from tests)."""

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench/relay_bench.py", "--smoke", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert set(data["shapes"]) == {"serial", "paced-100", "saturation-50", "open-1000"}
    for shape in data["shapes"].values():
        assert shape["odla"]["failures"] == 0 and shape["direct"]["failures"] == 0
        assert shape["odla"]["tokens"] == shape["direct"]["tokens"] > 0
        assert shape["odla"]["cpu_us_per_token_operator"] > 0
    assert "ttft p50 ms" in result.stdout and data["peak_rss_mb"]["operator"] > 0


def test_cluster_benchmark_smoke_run(tmp_path):
    """Every router is driven with the same arrivals, and ODLA loses none of them."""
    out = tmp_path / "cluster.json"
    result = subprocess.run([sys.executable, "bench/cluster_bench.py", "--smoke", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    odla = data["results"]["odla"]
    assert odla["sent"] == data["requests"] > 0
    assert odla["completed"] == odla["sent"] and odla["errors"] == odla["gave_up"] == 0
    assert sum(odla["share"].values()) >= odla["sent"]
    assert all(r["sent"] == data["requests"] for r in data["results"].values())
