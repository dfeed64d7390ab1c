"""Learning-rate schedules against their documented formulas; bad schedule arguments; the
runtime facts: ``python -m fastopt info``, ``fastopt.info()``, ``cuda_available()``,
FASTOPT_CPU, the CPU path and thread settings."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import schedules

from conftest import HAS_AVX2, using_threads

TS = list(range(0, 40))
LRS = [1.0, 0.1, 3e-4]


# ---- schedules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lr", LRS)
def test_constant(lr):
    s = schedules.Constant()
    assert [s(t, lr) for t in TS] == [lr] * len(TS)


def test_step_decay_known_values():
    s = schedules.StepDecay(3, 0.5)
    assert [s(t, 1.0) for t in range(9)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert schedules.StepDecay(2)(4, 1.0) == pytest.approx(0.01)  # default gamma 0.1


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("step_size,gamma", [(1, 0.5), (4, 0.1), (7, 0.9), (3, 0.0), (2, 1.0)])
def test_step_decay_formula(step_size, gamma, lr):
    s = schedules.StepDecay(step_size, gamma)
    for t in TS:
        assert s(t, lr) == pytest.approx(lr * gamma ** (t // step_size), rel=1e-15, abs=0)


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("alpha,T", [(1.0, 10), (0.5, 3.0), (0.0, 5), (2.0, 0.5)])
def test_inverse_time_formula(alpha, T, lr):
    s = schedules.InverseTime(alpha, T)
    for t in TS:
        assert s(t, lr) == pytest.approx(lr / (1 + alpha * t / T), rel=1e-15)
    assert s(0, lr) == lr
    assert schedules.InverseTime(1.0, 10)(10, 1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("total,min_lr", [(10, 0.0), (25, 1e-5), (1, 0.0), (7, 1e-4)])
def test_cosine_formula(total, min_lr, lr):
    s = schedules.Cosine(total, min_lr=min_lr)
    for t in TS:
        frac = min(t, total) / total
        want = min_lr + (lr - min_lr) * (1 + math.cos(math.pi * frac)) / 2
        assert s(t, lr) == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert s(0, lr) == pytest.approx(lr)
    assert s(total, lr) == pytest.approx(min_lr, abs=1e-15)
    assert s(total + 5, lr) == pytest.approx(min_lr, abs=1e-15)  # stays at min_lr
    if total % 2 == 0:
        assert s(total // 2, lr) == pytest.approx((lr + min_lr) / 2)


def test_cosine_is_monotone_decreasing():
    s = schedules.Cosine(20, min_lr=0.01)
    values = [s(t, 1.0) for t in range(25)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("warmup", [1, 3, 10])
def test_linear_warmup_without_then(warmup, lr):
    s = schedules.LinearWarmup(warmup)
    for t in TS:
        want = lr * (t + 1) / warmup if t < warmup else lr
        assert s(t, lr) == pytest.approx(want, rel=1e-15)
    assert s(warmup - 1, lr) == pytest.approx(lr)  # reaches lr on the last warmup step


@pytest.mark.parametrize("lr", LRS)
@pytest.mark.parametrize("warmup", [1, 4])
def test_linear_warmup_then_another_schedule(warmup, lr):
    after = schedules.Cosine(10, min_lr=1e-6)
    s = schedules.LinearWarmup(warmup, then=after)
    for t in TS:
        if t < warmup:
            want = lr * (t + 1) / warmup
        else:
            frac = min(t - warmup, 10) / 10
            want = 1e-6 + (lr - 1e-6) * (1 + math.cos(math.pi * frac)) / 2
        assert s(t, lr) == pytest.approx(want, rel=1e-12)
    # `then` sees t counted from the end of the warmup, and any callable works.
    s2 = schedules.LinearWarmup(3, then=lambda t, base: base * 100 + t)
    assert [s2(t, 1.0) for t in range(3, 6)] == [100.0, 101.0, 102.0]


BAD_SCHEDULES = [
    ("step_size", lambda: schedules.StepDecay(0), (ValueError,)),
    ("step_size", lambda: schedules.StepDecay(-2), (ValueError,)),
    ("step_size", lambda: schedules.StepDecay(1.5), (ValueError, TypeError)),
    ("step_size", lambda: schedules.StepDecay(True), (ValueError, TypeError)),
    ("step_size", lambda: schedules.StepDecay("3"), (ValueError, TypeError)),
    ("gamma", lambda: schedules.StepDecay(2, gamma=-0.1), (ValueError,)),
    ("gamma", lambda: schedules.StepDecay(2, gamma=float("nan")), (ValueError,)),
    ("gamma", lambda: schedules.StepDecay(2, gamma="0.1"), (TypeError,)),
    ("alpha", lambda: schedules.InverseTime(-1.0, 10), (ValueError,)),
    ("alpha", lambda: schedules.InverseTime(float("inf"), 10), (ValueError,)),
    ("T", lambda: schedules.InverseTime(1.0, 0), (ValueError,)),
    ("T", lambda: schedules.InverseTime(1.0, -5), (ValueError,)),
    ("T", lambda: schedules.InverseTime(1.0, float("nan")), (ValueError,)),
    ("total_steps", lambda: schedules.Cosine(0), (ValueError,)),
    ("total_steps", lambda: schedules.Cosine(2.5), (ValueError, TypeError)),
    ("min_lr", lambda: schedules.Cosine(10, min_lr=-1e-3), (ValueError,)),
    ("min_lr", lambda: schedules.Cosine(10, min_lr=float("inf")), (ValueError,)),
    ("warmup_steps", lambda: schedules.LinearWarmup(0), (ValueError,)),
    ("warmup_steps", lambda: schedules.LinearWarmup(-1), (ValueError,)),
    ("warmup_steps", lambda: schedules.LinearWarmup(None), (ValueError, TypeError)),
    ("then", lambda: schedules.LinearWarmup(2, then=5), (TypeError,)),
    ("then", lambda: schedules.LinearWarmup(2, then="cosine"), (TypeError,)),
]


@pytest.mark.parametrize("arg,make,excs", BAD_SCHEDULES,
                         ids=[f"{i}-{a}" for i, (a, _, _) in enumerate(BAD_SCHEDULES)])
def test_bad_schedule_arguments(arg, make, excs):
    with pytest.raises(excs, match=arg):
        make()


def test_schedules_are_usable_by_every_class():
    import numpy as np
    for cls in (fastopt.SGD, fastopt.Adagrad, fastopt.RMSprop, fastopt.Adam, fastopt.AdamW):
        p = np.ones(3)
        o = cls(p, lr=0.1, schedule=schedules.StepDecay(2, 0.5))
        for expect in (0.1, 0.1, 0.05, 0.05, 0.025):
            assert o.current_lr() == pytest.approx(expect)
            o.step(np.full(3, 0.5))


# ---- runtime facts --------------------------------------------------------------------------------

def _run_python(args, tmp_path, env_extra=None, drop=("FASTOPT_CPU",)):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_info(tmp_path):
    r = _run_python(["-m", "fastopt", "info"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert fastopt.__version__ in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "cpu_path" in lines and lines["cpu_path"].split()[-1] in ("scalar", "avx2")
    want_path = "avx2" if HAS_AVX2 else "scalar"
    assert lines["cpu_path"].split()[-1] == want_path
    assert "cuda" in lines
    cuda_line = lines["cuda"]
    if fastopt.cuda_available():
        assert "usable" in cuda_line and "not usable" not in cuda_line
    else:
        assert "not usable" in cuda_line or "not built" in cuda_line


def test_cli_info_json(tmp_path):
    r = _run_python(["-m", "fastopt", "info", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["version"] == fastopt.__version__
    assert facts["cpu_path"] in ("scalar", "avx2")
    assert isinstance(facts["cuda"]["usable"], bool)


def test_cli_without_command_fails(tmp_path):
    r = _run_python(["-m", "fastopt"], tmp_path)
    assert r.returncode != 0


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_cli_refuses_unwritable_outputs_before_the_run(command, tmp_path, capsys):
    """--json/--plot paths are checked first: a run of minutes is not lost at its end."""
    from fastopt.__main__ import main

    (tmp_path / "dir").mkdir()
    for option, path, why in (("--json", tmp_path / "no" / "out.json", "there is no directory"),
                              ("--plot", tmp_path / "dir", "is a directory")):
        with pytest.raises(SystemExit) as info:
            main([command, "--quick", option, str(path)])
        assert info.value.code == 2
        assert f"error: {option} {path}: {why}" in capsys.readouterr().err


def test_info_keys_and_types():
    info = fastopt.info()
    for key in ("version", "compiler", "openmp", "cpu_has_avx2_fma", "cpu_paths_built",
                "cpu_path", "num_threads", "numpy", "python", "cuda", "cpu_count",
                "fastopt_cpu_env"):
        assert key in info, key
    assert info["version"] == fastopt.__version__
    assert isinstance(info["cpu_has_avx2_fma"], bool)
    assert info["cpu_path"] == fastopt.get_cpu_path()
    assert info["num_threads"] == fastopt.get_num_threads() >= 1
    assert set(info["cpu_paths_built"]) >= {"scalar"}
    assert isinstance(info["cuda"], dict) and isinstance(info["cuda"]["usable"], bool)
    assert isinstance(info["cuda"].get("reason", ""), str)


def test_version_matches_distribution():
    from importlib import metadata
    try:
        dist_version = metadata.version("fastopt")
    except metadata.PackageNotFoundError:
        pytest.skip("fastopt is not installed as a distribution")
    assert fastopt.__version__ == dist_version


def test_cuda_available_is_a_bool():
    value = fastopt.cuda_available()
    assert isinstance(value, bool)
    assert value == fastopt.info()["cuda"]["usable"]


@pytest.mark.parametrize("env,want", [("scalar", "scalar"), ("avx2", "avx2"), ("auto", None),
                                      (" scalar ", "scalar")])
def test_fastopt_cpu_environment_variable(env, want, tmp_path):
    if want == "avx2" and not HAS_AVX2:
        pytest.skip("no AVX2+FMA")
    want = want or ("avx2" if HAS_AVX2 else "scalar")
    code = ("import fastopt, json; print(json.dumps([fastopt.get_cpu_path(), "
            "fastopt.info()['fastopt_cpu_env']]))")
    r = _run_python(["-c", code], tmp_path, {"FASTOPT_CPU": env})
    assert r.returncode == 0, r.stderr
    path, seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert path == want
    assert seen == env


def test_fastopt_cpu_environment_variable_invalid_value_warns(tmp_path):
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import fastopt; print(fastopt.get_cpu_path())")
    r = _run_python(["-c", code], tmp_path, {"FASTOPT_CPU": "sse9"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == ("avx2" if HAS_AVX2 else "scalar")
    assert "FASTOPT_CPU" in r.stderr


def test_set_cpu_path_round_trip():
    try:
        fastopt.set_cpu_path("scalar")
        assert fastopt.get_cpu_path() == "scalar"
        assert fastopt.info()["cpu_path"] == "scalar"
        if HAS_AVX2:
            fastopt.set_cpu_path("avx2")
            assert fastopt.get_cpu_path() == "avx2"
        fastopt.set_cpu_path("auto")
        assert fastopt.get_cpu_path() == ("avx2" if HAS_AVX2 else "scalar")
    finally:
        fastopt.set_cpu_path("auto")


@pytest.mark.skipif(HAS_AVX2, reason="only meaningful on a CPU without AVX2")
def test_set_cpu_path_avx2_refused_without_avx2():
    with pytest.raises(ValueError, match="path"):
        fastopt.set_cpu_path("avx2")


def test_set_num_threads_round_trip():
    for n in (1, 3, 2, np.int64(2), np.uint8(1)):
        with using_threads(n):
            assert fastopt.get_num_threads() == n
            assert fastopt.info()["num_threads"] == n
    for bad in (True, np.bool_(True), 2.0):
        with pytest.raises(TypeError, match=r"^n: expected an int >= 1"):
            fastopt.set_num_threads(bad)
