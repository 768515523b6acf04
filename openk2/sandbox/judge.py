"""Run code against unit tests in a sandbox and get per-test results.

The one entry point for the RL code gym (reward = pass rate), the trajectory judge, and HumanEval-style
evaluation::

    report = await run_tests(solution_code, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    report.passed, report.total, [t.status for t in report.results], report.results[1].error

    # HumanEval-style: a test program that defines check(), called once on the entry point
    report = await run_tests(prompt + completion, [TestCase("check", "check(add)")], setup=problem["test"])

The solution runs once as a module; every test runs in a copy of its namespace, with its own time limit
(`per_test_timeout_s`, SIGALRM), inside ONE sandbox run (whose limits bound the whole). A test passes when
its code runs without raising. Results stream to a file in the working directory, so a run that times out
or is killed still reports the tests that finished; the rest get the run's status.

Trust: the tests run in the solution's own process (like HumanEval's harness), so hostile code can fake
its own results (e.g. by patching the driver); it cannot escape the sandbox. Use one sandbox per test
(`isolate=True`: each test in a fresh process, verdict from the exit status) when that matters more than
speed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from openk2.sandbox.types import OK, Limits, RunRequest, RunResult, SandboxError

RESULTS_FILE = ".openk2_results.jsonl"
SPEC_FILE = ".openk2_tests.json"
DRIVER_FILE = ".openk2_driver.py"

PASSED, FAILED, TEST_ERROR, TEST_TIMEOUT, NOT_RUN = "passed", "failed", "error", "timeout", "not_run"

_DRIVER = r'''
import json, os, signal, sys, time, traceback

class _TestTimeout(BaseException):
    pass

def _alarm(signum, frame):
    raise _TestTimeout()

spec = json.load(open(%(spec)r))
out = open(%(results)r, "a", buffering=1)
def emit(**kw):
    out.write(json.dumps(kw) + "\n")
    out.flush()

SOURCES = {}

def describe(e, code, filename):
    msg = "".join(traceback.format_exception_only(type(e), e)).strip()
    line = ""
    SOURCES[filename] = code
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        if fr.filename in SOURCES:  # the deepest frame in the test or the setup (e.g. HumanEval's check)
            lines = SOURCES[fr.filename].splitlines()
            if 0 < fr.lineno <= len(lines):
                line = lines[fr.lineno - 1].strip()
            break
    return msg + (" (at: " + line + ")" if line and isinstance(e, AssertionError) else "")

signal.signal(signal.SIGALRM, _alarm)
ns = {"__name__": "__solution__"}
for fname, label in (("solution.py", "solution"), ("setup.py", "setup")):
    if not os.path.exists(fname):
        continue
    code = open(fname).read()
    if label == "setup":
        SOURCES[fname] = code
    signal.setitimer(signal.ITIMER_REAL, spec["load_timeout_s"])
    try:
        exec(compile(code, fname, "exec"), ns)
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        emit(load_error=label + ": " + ("timed out" if isinstance(e, _TestTimeout) else describe(e, code, fname)))
        sys.exit(0)
    signal.setitimer(signal.ITIMER_REAL, 0)
for i, test in enumerate(spec["tests"]):
    g = dict(ns)
    fname = "<test %%d>" %% i
    t0 = time.perf_counter()
    status, err = "passed", ""
    signal.setitimer(signal.ITIMER_REAL, spec["per_test_timeout_s"])
    try:
        exec(compile(test["code"], fname, "exec"), g)
    except _TestTimeout:
        status, err = "timeout", "test timed out after %%g s" %% spec["per_test_timeout_s"]
    except AssertionError as e:
        status, err = "failed", describe(e, test["code"], fname)
    except BaseException as e:
        status, err = "error", describe(e, test["code"], fname)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    emit(i=i, status=status, error=err[:2000], duration_s=round(time.perf_counter() - t0, 6))
emit(done=True)
'''


@dataclass
class TestCase:
    __test__ = False  # not a pytest class
    name: str
    code: str


@dataclass
class TestResult:
    __test__ = False  # not a pytest class
    name: str
    status: str           # passed, failed (assertion), error (another exception), timeout, not_run
    error: str = ""
    duration_s: float | None = None

    @property
    def passed(self) -> bool:
        return self.status == PASSED


@dataclass
class TestReport:
    __test__ = False  # not a pytest class
    results: list[TestResult]
    run: RunResult | None = None        # the sandbox run (status, stdout, stderr, times); per test when isolated
    load_error: str = ""                # the solution (or setup) itself failed to load
    runs: list[RunResult] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(t.passed for t in self.results)

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    def to_json(self) -> dict:
        return {"passed": self.passed, "total": self.total, "pass_rate": self.pass_rate,
                "load_error": self.load_error, "results": [asdict(t) for t in self.results],
                "run": self.run.to_json() if self.run else None}


def _cases(tests: Sequence[str | TestCase]) -> list[TestCase]:
    out = []
    for i, t in enumerate(tests):
        if isinstance(t, TestCase):
            out.append(t)
        elif isinstance(t, str):
            out.append(TestCase(f"test_{i}", t))
        else:
            raise SandboxError(f"test {i}: expected code (str) or TestCase, got {type(t).__name__}")
    if not out:
        raise SandboxError("run_tests: no tests given")
    return out


def _run_status_to_test(run: RunResult) -> tuple[str, str]:
    if run.status == "timeout":
        return TEST_TIMEOUT, f"sandbox run timed out ({run.error})"
    if run.status == OK:
        return NOT_RUN, "the process exited before this test ran" + (f" (exit code {run.exit_code})"
                                                                      if run.exit_code else "")
    return NOT_RUN, f"sandbox run ended: {run.status}" + (f" ({run.error})" if run.error else "")


async def run_tests(solution: str, tests: Sequence[str | TestCase], *, setup: str = "", sandbox=None,
                    limits: Limits | None = None, per_test_timeout_s: float | None = None,
                    isolate: bool = False, files: dict | None = None) -> TestReport:
    """Run `solution` (Python source), then `setup`, then each test; per-test pass/fail with the error."""
    from openk2.sandbox.pool import Sandbox

    sandbox = sandbox or Sandbox()
    cases = _cases(tests)
    limits = limits or sandbox.limits
    per_test = float(per_test_timeout_s or limits.timeout_s)
    if isolate:
        import asyncio

        reports = await asyncio.gather(*(run_tests(solution, [c], setup=setup, sandbox=sandbox, limits=limits,
                                                   per_test_timeout_s=per_test, files=files) for c in cases))
        return TestReport([r.results[0] for r in reports], run=None, load_error=reports[0].load_error,
                          runs=[r.run for r in reports if r.run])
    spec = {"tests": [asdict(c) for c in cases], "per_test_timeout_s": per_test, "load_timeout_s": per_test}
    req_files = dict(files or {})
    req_files.update({"solution.py": solution, DRIVER_FILE: _DRIVER % {"spec": SPEC_FILE, "results": RESULTS_FILE},
                      SPEC_FILE: json.dumps(spec)})
    if setup:
        req_files["setup.py"] = setup
    run = await sandbox.run(RunRequest([sandbox.backend_python(), DRIVER_FILE], files=req_files,
                                       fetch_files=[RESULTS_FILE], limits=limits))
    return _report(cases, run)


def _report(cases: list[TestCase], run: RunResult) -> TestReport:
    lines = run.files.get(RESULTS_FILE, b"").decode(errors="replace").splitlines()
    got: dict[int, dict] = {}
    load_error = ""
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if "load_error" in d:
            load_error = str(d["load_error"])
        elif isinstance(d.get("i"), int) and 0 <= d["i"] < len(cases):
            got.setdefault(d["i"], d)
    results = []
    if run.status == "error" and not got:
        load_error = load_error or f"sandbox error: {run.error}"
    fallback = _run_status_to_test(run)
    for i, c in enumerate(cases):
        if i in got:
            d = got[i]
            results.append(TestResult(c.name, str(d.get("status")), str(d.get("error", "")), d.get("duration_s")))
        elif load_error:
            results.append(TestResult(c.name, TEST_ERROR, load_error))
        else:
            results.append(TestResult(c.name, *fallback))
    return TestReport(results, run=run, load_error=load_error, runs=[run])


def run_tests_sync(solution: str, tests: Sequence[str | TestCase], **kw) -> TestReport:
    from openk2.utils.aio import run_coroutine

    return run_coroutine(run_tests(solution, tests, **kw))
