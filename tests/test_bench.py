"""`python -m fastopt bench` runs end to end and writes a well-formed JSON report."""
import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("only", ["adamw", "quant,newton"])
def test_bench_quick_writes_json_with_passing_checks(tmp_path, only):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastopt", "bench", "--quick", "--device", "all", "--only", only,
         "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    machine = report["machine"]
    for key in ["version", "cpu_model", "cpu_has_avx2_fma", "num_threads", "numpy", "torch",
                "cuda", "date"]:
        assert key in machine
    ceiling = report["ceiling_cpu"]
    assert ceiling["gbs"] > 0 and ceiling["bytes_per_element"] == 12
    cases = report["cases"]
    assert cases, "no case ran"
    for case in cases:
        assert case["check"] == "ok", case
        assert case["times_ms"]["fastopt"] > 0
        assert "numpy" in case["times_ms"] or "numpy.linalg.solve" in case["times_ms"]
        assert case["pct_of_ceiling"]["fastopt"] > 0
        assert case["speedup_vs_best_peer"] > 0
        assert case["case"] in proc.stdout  # the table shows every case
    names = " ".join(c["case"] for c in cases)
    for part in only.split(","):
        assert part.replace("quant", "int8") in names
    if not machine["cuda"]["usable"]:  # --device all: the GPU half says why it did not run
        assert "cuda_skipped" in report and "cuda: skipped" in proc.stdout


def test_bench_rejects_unknown_case(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastopt", "bench", "--only", "adamx"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "adamx" in proc.stderr
