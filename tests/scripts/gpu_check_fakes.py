"""benchmarks/gpu_check.py with fake checks added, to test its runner (tests/test_gpu_check.py).

Each fake runs in a child process of this script, as a real check runs in a child of gpu_check.py:
`pass` and `pass_after` pass, `fail` fails, `raise` raises, `crash` kills its own process, `hang` sleeps
past its 3 s limit, `slow` sleeps past a short budget.
"""
import importlib.util
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)
Check, Result = gpu_check.Check, gpu_check.Result


def _raise(ctx):
    raise RuntimeError("planted error")


def _crash(ctx):
    os._exit(9)


def _sleep(seconds):
    def run(ctx):
        time.sleep(seconds)
        return Result("PASS")
    return run


gpu_check.CHECKS += [
    Check("fake_pass", "passes", False, 30, 1, lambda ctx: Result("PASS", {"answer": 42})),
    Check("fake_fail", "fails", False, 30, 1, lambda ctx: Result("FAIL", {"answer": 41}, "planted failure")),
    Check("fake_raise", "raises", False, 30, 1, _raise),
    Check("fake_crash", "kills its process", False, 30, 1, _crash),
    Check("fake_hang", "outlives its limit", False, 3, 1, _sleep(60)),
    Check("fake_slow", "outlives a short budget", False, 60, 1, _sleep(60)),
    Check("fake_gpu", "needs a GPU", True, 30, 1, lambda ctx: Result("PASS")),
    Check("fake_pass_after", "passes after the others", False, 30, 1, lambda ctx: Result("PASS", {"n": 1})),
]

if __name__ == "__main__":
    sys.exit(gpu_check.main(sys.argv[1:], script=Path(__file__).resolve()))
