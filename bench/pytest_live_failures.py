"""pytest plugin for bench/gpu_check.sh, so that a run cut off at its time limit still
says which tests failed and why:

- each failing test's report (traceback included) is appended to the file named by
  FASTOPT_FAILURES_LOG as soon as it fails (with pytest-xdist by the controller, which
  receives every worker's reports, crashed workers' tests included);
- FASTOPT_TEST_TIMEOUT_S: a test running longer gets the stacks of all its threads
  appended to that file, then its process ends (a kernel or driver call that hangs takes
  no Python signal). Under xdist the worker is replaced and the run goes on; the test is
  reported as "worker crashed".

    PYTHONPATH=bench FASTOPT_FAILURES_LOG=out/failures.log FASTOPT_TEST_TIMEOUT_S=120 \\
        python -m pytest -p pytest_live_failures -n 8 ...
"""
from __future__ import annotations

import faulthandler
import os
import threading
import time

import pytest

_path = os.environ.get("FASTOPT_FAILURES_LOG")
_timeout = float(os.environ.get("FASTOPT_TEST_TIMEOUT_S", "0") or 0)
_start = time.monotonic()
_controller = True


def _append(text: str) -> None:
    with open(_path, "a", encoding="utf-8") as f:  # one write: workers append too
        f.write(text)


def pytest_configure(config) -> None:
    global _controller
    _controller = not hasattr(config, "workerinput")  # an xdist worker has workerinput


def pytest_runtest_logreport(report) -> None:
    if not (_path and _controller and report.failed):
        return
    worker = getattr(getattr(report, "node", None), "gateway", None)
    _append(f"==== FAILED ({report.when}) {report.nodeid}   "
            f"[{time.monotonic() - _start:.0f}s{', ' + worker.id if worker else ''}]\n"
            f"{report.longreprtext.rstrip()}\n\n")


def _time_out(nodeid: str) -> None:
    if _path:
        with open(_path, "a", encoding="utf-8") as f:
            f.write(f"==== TIMEOUT {nodeid}: still running after {_timeout:.0f}s "
                    f"(FASTOPT_TEST_TIMEOUT_S); its threads:\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.write("\n")
    os._exit(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    timer = None
    if _timeout > 0:
        timer = threading.Timer(_timeout, _time_out, args=(item.nodeid,))
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
