"""`python -m fastopt bench` runs end to end and writes a well-formed JSON report.

The GPU half runs for real only where CUDA is usable (the `cuda` test); elsewhere its whole
pipeline -- check against the CPU kernels, event timing, peers, table, JSON, plot -- runs on
a stand-in device (PyTorch CPU tensors behind the same DeviceArrays interface)."""
import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import _ext
from fastopt.bench import common as bench_common
from fastopt.bench import gpu as bench_gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
        assert case["pct_of_ceiling"]["fastopt"] > 0
        assert case["case"] in proc.stdout  # the table shows every case
        if case["device"] == "cpu":
            assert "numpy" in case["times_ms"] or "numpy.linalg.solve" in case["times_ms"]
            assert case["speedup_vs_best_peer"] > 0
    names = " ".join(c["case"] for c in cases if c["device"] == "cpu")
    for part in only.split(","):
        assert part.replace("quant", "int8") in names
    if not machine["cuda"]["usable"]:  # --device all: the GPU half says why it did not run
        assert "cuda_skipped" in report and "cuda: skipped" in proc.stdout


def test_bench_rejects_unknown_case(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastopt", "bench", "--only", "adamx"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "adamx" in proc.stderr


# ---- the GPU half ---------------------------------------------------------------------------

@pytest.mark.skipif(fastopt.cuda_available(), reason="the message of a machine without a usable GPU")
def test_bench_cuda_is_skipped_with_its_reason_without_a_gpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastopt", "bench", "--quick", "--device", "cuda", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cuda: skipped (" in proc.stdout
    report = json.loads(out.read_text())
    why = report["cuda_skipped"]
    assert why and why in proc.stdout
    if not report["machine"]["cuda"]["usable"]:
        assert why == _ext.cuda_unavailable_reason()
    assert "ceiling_cuda" not in report and not report.get("cases")


@pytest.mark.cuda
@pytest.mark.skipif(not fastopt.cuda_available(), reason="needs a usable CUDA GPU")
@pytest.mark.parametrize("only,kinds", [("adamw,sgd", {"adamw", "sgd"}),
                                        ("quant,newton", {"int8", "newton"})])
def test_bench_gpu_rows_pass_their_checks(tmp_path, only, kinds):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastopt", "bench", "--quick", "--device", "cuda", "--only",
         only, "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    if "cuda_skipped" in report:
        pytest.skip(f"no GPU array library: {report['cuda_skipped']}")
    assert report["ceiling_cuda"]["gbs"] > 0 and report["ceiling_cuda"]["bytes_per_element"] == 8
    assert report["gpu"]["device"] != "unknown"
    rows = [c for c in report["cases"] if c["device"] == "cuda"]
    names = {c["case"].split()[0] for c in rows}
    assert names == kinds, rows
    if "adamw" in kinds:
        assert any(c["case"].endswith("1000x4096") for c in rows)
    else:
        assert len(rows) == len(bench_common.QUANT_CASES) + len(bench_common.NEWTON_CASES)
    for case in rows:
        assert case["check"] == "ok", case
        assert "bit_identical_to_cpu" in case
        if "adamw" not in kinds:  # int8 and Newton n <= 64 must be bit-identical
            assert case["bit_identical_to_cpu"] is True, case
            assert case["target"]["met"] in (True, False, None), case
        assert case["times_ms"]["fastopt"] > 0 and case["pct_of_ceiling"]["fastopt"] > 0
        assert case["case"] in proc.stdout


# A stand-in device: the GPU half on PyTorch CPU tensors, small sizes.
@pytest.fixture
def stand_in_gpu(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(_ext, "cuda_unavailable_reason", lambda: "")
    monkeypatch.setattr(fastopt.bench, "_device_arrays", lambda: (bench_gpu.TorchArrays(torch, "cpu"), ""))
    monkeypatch.setattr(bench_gpu.GpuBench, "big_log2", lambda self: 12)
    layouts = bench_gpu.GpuBench.layouts
    monkeypatch.setattr(bench_gpu.GpuBench, "layouts",
                        lambda self: [(lay, shapes[:20]) for lay, shapes in layouts(self)])
    return torch


def _run_in_process(tmp_path, only="adamw", plot=False):
    out = tmp_path / "bench.json"
    args = argparse.Namespace(only=only, device="cuda", quick=True, json=str(out),
                              plot=str(tmp_path / "bench.png") if plot else None, progress=False)
    rc = fastopt.bench.run(args)
    return rc, json.loads(out.read_text())


def test_gpu_half_on_a_stand_in_device(tmp_path, stand_in_gpu, capsys):
    rc, report = _run_in_process(tmp_path, plot=True)
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "cuda: skipped" not in stdout and "GPU:" in stdout
    ceiling = report["ceiling_cuda"]
    assert ceiling["gbs"] > 0 and ceiling["bytes_per_element"] == 8
    for key in ["device", "driver_version", "runtime_version", "arrays", "torch", "cupy"]:
        assert key in report["gpu"]
    rows = report["cases"]
    assert [r["case"] for r in rows] == ["adamw 1x2^12", "adamw 1000x4096"]
    for r in rows:
        assert r["device"] == "cuda" and r["check"] == "ok", r
        assert r["bit_identical_to_cpu"] is True
        assert {"fastopt", "torch-fused", "torch-foreach"} <= set(r["times_ms"])
        assert r["speedup_vs_best_peer"] > 0
        assert r["target"]["target"] and isinstance(r["target"]["met"], bool)
        assert r["case"] in stdout
    assert "parity: 2 of 2" in stdout and "targets" in stdout
    if bench_common._import_cupy() is None:
        assert rows[0]["notes"]["cupy"] == "not installed"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "bench.png").stat().st_size > 0


# Small Newton cases for the stand-in (n = 80: the n > 64 path, checked against NumPy only).
SMALL_NEWTON = [(8, 512), (32, 256), (80, 64)]


def test_gpu_quant_and_newton_on_a_stand_in_device(tmp_path, stand_in_gpu, monkeypatch, capsys):
    monkeypatch.setattr(bench_common, "NEWTON_CASES", SMALL_NEWTON)
    rc, report = _run_in_process(tmp_path, only="quant,newton", plot=True)
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    rows = {r["case"]: r for r in report["cases"]}
    assert list(rows) == [f"int8 {q}" for q in bench_common.QUANT_CASES] + [
        "newton n=8 x128", "newton n=32 x64", "newton n=80 x16"]  # --quick: a quarter
    for name, r in rows.items():
        assert r["device"] == "cuda" and r["check"] == "ok", r
        assert r["times_ms"]["fastopt"] > 0 and r["speedup_vs_best_peer"] > 0
        assert name in stdout
    for q, b in bench_common.QUANT_CASES.items():
        r = rows[f"int8 {q}"]
        assert r["bit_identical_to_cpu"] is True and r["bytes_per_element"] == b
        assert r["elements"] == 1 << 12
        assert isinstance(r["target"]["met"], bool) and r["target"]["target"]
    for q in ["blockwise-256 quantize", "blockwise-256 dequantize"]:
        assert "torch eager" in rows[f"int8 {q}"]["times_ms"]
        assert rows[f"int8 {q}"]["notes"]["torch.compile"].startswith("not available")
    assert "torch.quantize_per_tensor" in rows["int8 per-tensor quantize"]["times_ms"]
    assert "torch.quantize_per_tensor_dynamic" in rows["int8 dynamic per-tensor quantize"]["times_ms"]
    assert rows["int8 per-tensor quantize"]["target"]["target"] == \
        ">= 1x as fast as torch.quantize_per_tensor"
    for n in (8, 32):
        r = rows[f"newton n={n} x{dict(SMALL_NEWTON)[n] // 4}"]
        assert r["bit_identical_to_cpu"] is True
        assert {"fastopt", "fastopt-skip", "torch.linalg.solve", "torch cholesky+solve"} <= \
            set(r["times_ms"])
        assert "cupy.linalg.solve" in r["times_ms"] or r["notes"]["cupy"]
        assert r["target"]["target"].startswith(f">= {5 if n == 8 else 10}x as fast as the fastest")
        assert isinstance(r["target"]["met"], bool)
    big = rows["newton n=80 x16"]
    assert "bit_identical_to_cpu" not in big and "target" not in big  # n > 64: NumPy's check
    assert "parity: 6 of 6" in stdout
    assert "int8 per-tensor quantize: fastopt" in stdout and "newton n=32 x64: fastopt" in stdout
    pytest.importorskip("matplotlib")
    assert (tmp_path / "bench.png").stat().st_size > 0


def _skew(monkeypatch, how):
    """Makes every host copy of a (stand-in) device array differ from the array."""
    copy = bench_gpu._host_copy
    monkeypatch.setattr(bench_gpu, "_host_copy",
                        lambda a: copy(a) if isinstance(a, np.ndarray) else how(copy(a)))


def test_gpu_case_differing_from_the_cpu_kernels_fails_without_a_time(tmp_path, stand_in_gpu,
                                                                       monkeypatch, capsys):
    _skew(monkeypatch, lambda a: a + np.float32(1e-2))
    rc, report = _run_in_process(tmp_path, only="sgd")
    stdout = capsys.readouterr().out
    assert rc == 1
    for r in report["cases"]:
        assert r["check"].startswith("FAIL: differs from fastopt's CPU kernels"), r
        assert r["times_ms"] == {}
        assert r["case"] in stdout
    assert "FAIL" in stdout


def test_gpu_case_within_tolerance_says_it_is_not_bit_identical(tmp_path, stand_in_gpu,
                                                                monkeypatch, capsys):
    _skew(monkeypatch, lambda a: np.nextafter(a, np.float32(np.inf)))
    rc, report = _run_in_process(tmp_path, only="rmsprop")
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    for r in report["cases"]:
        assert r["check"] == "ok" and r["bit_identical_to_cpu"] is False, r
        assert any("not bit-identical" in m for m in r["remarks"])
    assert "parity: 0 of 2" in stdout


# Adafactor's GPU rows on the stand-in: small matrices (a conv's 1 x 1 and 5 x 5), larger
# ones and a vector; the stand-in runs the CPU kernel, so the check finds it bit-identical.
ADAFACTOR_LAYOUTS = [("mixed", [(33, 17), (40, 3, 3), (7,)]), ("convs", [(20, 8, 1, 1), (6, 4, 5, 5)])]


@pytest.mark.parametrize("skew", [None, "one-ulp", "far"])
def test_gpu_adafactor_rows_on_a_stand_in_device(tmp_path, stand_in_gpu, monkeypatch, capsys, skew):
    monkeypatch.setattr(bench_gpu.GpuBench, "adafactor_layouts", lambda self: ADAFACTOR_LAYOUTS)
    if skew == "one-ulp":
        _skew(monkeypatch, lambda a: np.nextafter(a, np.float32(np.inf)))
    elif skew == "far":
        _skew(monkeypatch, lambda a: a + np.float32(1e-2))
    rc, report = _run_in_process(tmp_path, only="adafactor")
    stdout = capsys.readouterr().out
    rows = report["cases"]
    assert [r["case"] for r in rows] == ["adafactor mixed", "adafactor convs"]
    for r in rows:
        assert r["device"] == "cuda" and r["case"] in stdout
        if skew == "far":
            assert r["check"].startswith("FAIL: differs from fastopt's CPU kernels"), r
            assert r["times_ms"] == {}
            continue
        assert r["check"] == "ok", r
        assert r["bit_identical_to_cpu"] is (skew is None), r
        assert any("not bit-identical" in m for m in r.get("remarks", [])) is (skew is not None)
        assert {"fastopt", "fastopt.torch", "torch-foreach", "torch-single"} <= set(r["times_ms"])
        assert all(t > 0 for t in r["times_ms"].values())
    assert rc == (1 if skew == "far" else 0), stdout


@pytest.mark.parametrize("how,why", [
    (lambda a: a + np.float32(1e-2), ["FAIL: differs from fastopt's CPU kernels",
                                      "FAIL: relative error"]),
    (lambda a: np.nextafter(a, np.float32(np.inf)), ["FAIL: differs from fastopt's CPU kernels"]),
], ids=["far", "one-ulp"])
def test_gpu_quant_and_newton_differing_from_the_cpu_kernels_fail_without_a_time(
        tmp_path, stand_in_gpu, monkeypatch, capsys, how, why):
    monkeypatch.setattr(bench_common, "NEWTON_CASES", SMALL_NEWTON[:2])
    _skew(monkeypatch, how)
    rc, report = _run_in_process(tmp_path, only="quant,newton")
    stdout = capsys.readouterr().out
    assert rc == 1
    assert len(report["cases"]) == len(bench_common.QUANT_CASES) + 2
    for r in report["cases"]:
        assert any(r["check"].startswith(w) for w in why), r
        assert r["times_ms"] == {} and "target" not in r
        assert r["case"] in stdout
    assert "parity: 0 of" in stdout


def test_gpu_case_that_raises_becomes_an_error_row(tmp_path, stand_in_gpu, monkeypatch, capsys):
    def boom(self, spec, *args):
        if spec.name == "adamw":
            raise RuntimeError("boom")
    monkeypatch.setattr(bench_gpu.GpuBench, "add_cupy_peer", boom)
    rc, report = _run_in_process(tmp_path, only="adamw,sophia")
    capsys.readouterr()
    assert rc == 1
    checks = {r["case"]: r["check"] for r in report["cases"]}
    assert checks["adamw 1x2^12"] == "ERROR: RuntimeError: boom"
    assert checks["sophia 1x2^12"] == "ok"  # the other cases still ran


def _stand_in_with_free_bytes(torch, free):
    """Stand-in device arrays that say `free` bytes of device memory are free."""
    class Limited(bench_gpu.TorchArrays):
        def free_bytes(self):
            return free
    return Limited(torch, "cpu")


def test_gpu_one_tensor_layout_is_sized_to_free_memory():
    torch = pytest.importorskip("torch")
    gpu = bench_gpu.GpuBench(False, lambda msg: None, _stand_in_with_free_bytes(torch, 2 << 30))
    layouts = gpu.layouts()
    # 16 float32 arrays of 2^k elements in 90% of 2 GiB: k = 24
    assert layouts[0] == ("1x2^24 (sized down)", [(1 << 24,)])
    assert "sized down from 2^28" in gpu.sized_down["1x2^24 (sized down)"]
    assert gpu.kinds["1x2^24 (sized down)"] == "one"
    assert [lay for lay, _ in layouts] == ["1x2^24 (sized down)", "gpt2-small", "1000x4096"]
    assert len(layouts[1][1]) == 148
    assert bench_gpu.GPU_TARGETS[("adamw", gpu.kinds["1000x4096"])].kind == "ms"


class FakeCupy:
    """Just enough of CuPy, on NumPy, to run the bench's CuPy code on the host: arrays are
    NumPy arrays and an ElementwiseKernel evaluates its operation with NumPy."""

    @staticmethod
    def asarray(a):
        return np.array(a)

    @staticmethod
    def zeros_like(a):
        return np.zeros_like(a)

    class ElementwiseKernel:
        def __init__(self, in_params, out_params, operation, name):
            self.ins = [p.split()[-1] for p in in_params.split(",")]
            self.outs = [p.split()[-1] for p in out_params.split(",")]
            self.statements = [s.strip().replace("1.0f", "np.float32(1.0)")
                               for s in operation.split(";") if s.strip()]

        def __call__(self, *args):
            env = dict(zip(self.ins + self.outs, args), sqrt=np.sqrt, np=np)
            for statement in self.statements:
                name, expr = statement.split("=", 1)
                env[name.strip()] = eval(expr, {}, env)
            for name, out in zip(self.outs, args[len(self.ins):]):
                out[...] = env[name]


@pytest.mark.parametrize("name", sorted(bench_gpu.CUPY_KERNELS))
def test_cupy_peer_kernel_computes_the_same_step(name):
    spec = bench_common.OPTIMIZERS[name]
    rng = np.random.default_rng(1)
    shapes = [(7,), (33, 5)]
    params = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    peer_params = [p.copy() for p in params]
    step = bench_gpu._cupy_elementwise_step(FakeCupy, spec, peer_params, grads)
    opt = spec.fastopt_class(params, **spec.hyper)
    for _ in range(3):
        step()
        opt.step(grads)
    for got, want in zip(peer_params, opt.params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fastopt_on_cupy_arrays_is_checked_and_timed_apart_from_the_peers():
    torch = pytest.importorskip("torch")
    gpu = bench_gpu.GpuBench(True, lambda msg: None, bench_gpu.TorchArrays(torch, "cpu"))
    gpu.cupy = FakeCupy
    spec = bench_common.OPTIMIZERS["adamw"]
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(64, dtype=np.float32) for _ in range(3)]
    grads = [rng.standard_normal(64, dtype=np.float32) for _ in range(3)]
    fns, row = {"fastopt": lambda: None}, bench_common.Row("adamw x", "cuda", 28, 192, 3)
    assert gpu.add_fastopt_on_cupy(spec, params, grads, fns, row) is None
    assert "fastopt-cupy" in fns and not row.remarks
    fns["fastopt-cupy"]()
    row.times_ms = {"fastopt": 1.0, "fastopt-cupy": 0.5, "torch-fused": 2.0}
    assert row.speedup_vs_best_peer() == 2.0  # fastopt-cupy is not a peer


# ---- bench/gpu_check.sh ---------------------------------------------------------------------

def test_gpu_check_script_parses():
    script = ROOT / "bench" / "gpu_check.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    helper = ROOT / "bench" / "sanitize_small.py"
    compile(helper.read_text(), str(helper), "exec")


# ---- the GPU int8 and Newton cases' parts -------------------------------------------------

def test_speedup_target_against_the_fastest_of_its_peers():
    target = bench_gpu.GPU_TARGETS[("newton", 32)]
    assert target.kind == "speedup" and target.value == 10
    assert set(target.peers) == set(bench_gpu.NEWTON_GPU_PEERS)
    row = bench_common.Row("newton n=32 x16384", "cuda", 4480, 16384, 1)
    row.times_ms = {"fastopt": 0.1, "fastopt-skip": 0.01, "torch.linalg.solve": 2.0,
                    "torch cholesky+solve": 0.9}
    assert target.met(row, 1.0) is False  # 9x the faster torch; fastopt-skip is no peer
    assert target.achieved(row, 1.0) == "9.00x as fast as torch cholesky+solve"
    row.times_ms["torch cholesky+solve"] = 1.0
    assert target.met(row, 1.0) is True
    row.times_ms = {"fastopt": 0.1}
    assert target.met(row, 1.0) is None and "no peer" in target.achieved(row, 1.0)


def test_summary_says_when_a_target_cannot_be_judged(capsys):
    row = bench_common.Row("int8 per-tensor quantize", "cuda", 5, 1 << 20, 1, times_ms={"fastopt": 1.0})
    row.target = bench_gpu.GPU_TARGETS[("int8", "per-tensor quantize")]
    bench_gpu._print_gpu_summary([row], 1.0, quick=False)
    assert "not measured (none of its peers ran)" in capsys.readouterr().out
    assert bench_common._row_json(row, 1.0)["target"]["met"] is None


def test_gpu_quant_and_newton_are_sized_to_free_memory():
    torch = pytest.importorskip("torch")
    gpu = bench_gpu.GpuBench(True, lambda msg: None, _stand_in_with_free_bytes(torch, 64 << 20))
    # 6 float32 arrays of 2^k elements in 90% of 64 MiB: k = 21 (quick asks for 2^24)
    row = gpu.quant_case("blockwise-256 dequantize")
    assert row.check == "ok" and row.elements == 1 << 21
    assert row.remarks[0].startswith("sized down from 2^24: 0.1 GiB free")
    # 8 copies of 4480 B per system: 1024 of the 4096 systems (--quick: 16384 / 4)
    row = gpu.newton_case(32, 16384)
    assert row.check == "ok" and row.case == "newton n=32 x1024" and row.elements == 1024
    assert row.remarks[0].startswith("sized down from 4096 systems")


def _compile_peer(monkeypatch, torch, compile_fn, budget=5.0):
    gpu = bench_gpu.GpuBench(True, lambda msg: None, bench_gpu.TorchArrays(torch, "cpu"))
    gpu.compile_peers = True
    monkeypatch.setattr(gpu, "COMPILE_BUDGET_S", budget)
    monkeypatch.setattr(torch, "compile", compile_fn)
    fns, row = {}, bench_common.Row("int8 blockwise-256 quantize", "cuda", 5, 512, 1)
    quantize = bench_common._torch_blockwise(torch)[0]
    gpu.add_compiled_peer(quantize, (torch.randn(512),), fns, row)
    return fns, row


def test_compiled_peer_runs_when_it_compiles(monkeypatch):
    torch = pytest.importorskip("torch")
    fns, row = _compile_peer(monkeypatch, torch, lambda fn, **kwargs: fn)
    q, absmax = fns["torch.compile"]()
    assert q.dtype == torch.int8 and q.shape == (2, 256) and absmax.shape == (2, 1)
    assert int(q.abs().max()) == 127 and not row.notes
    assert row.remarks[0].startswith("torch.compile: compiled in")


def test_compiled_peer_that_fails_is_not_available(monkeypatch):
    torch = pytest.importorskip("torch")

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("Cannot find a working triton installation\nmore")
        return call
    fns, row = _compile_peer(monkeypatch, torch, broken)
    assert "torch.compile" not in fns
    assert row.notes["torch.compile"] == \
        "not available (RuntimeError: Cannot find a working triton installation)"


def test_compiled_peer_that_compiles_too_long_is_not_available(monkeypatch):
    torch = pytest.importorskip("torch")
    import time

    def slow(fn, **kwargs):
        def call(*args):
            time.sleep(5)
            return fn(*args)
        return call
    t0 = time.perf_counter()
    fns, row = _compile_peer(monkeypatch, torch, slow, budget=0.2)
    assert time.perf_counter() - t0 < 3
    assert "torch.compile" not in fns
    assert row.notes["torch.compile"] == "not available (compiling took over 0.2 s)"
