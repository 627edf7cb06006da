"""Tests of neuroatrophy.jobs: real child processes speaking the progress protocol."""

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

import neuroatrophy
from neuroatrophy import jobs
from neuroatrophy.jobs import PROGRESS_ARGS, Job, package_root, parse_output_line

# A stand-in for the neuroatrophy command: one sub-command per behaviour under test.
FAKE_CLI = textwrap.dedent(
    """
    import json
    import os
    import signal
    import subprocess
    import sys
    import time


    def emit(**payload):
        print(json.dumps(payload), flush=True)


    def main(argv):
        if argv[-2:] != ["--progress", "json"]:
            print(f"missing --progress json in {argv}", file=sys.stderr)
            return 5
        command = argv[0]
        if command == "count":
            n = int(argv[1])
            print("starting", flush=True)
            for i in range(n):
                emit(progress=(i + 1) / n, message=f"step {i + 1}/{n}")
            # What two threads printing at once can produce: both objects on one line.
            sys.stdout.write('{"message": "thread 1"}{"message": "thread 2"}\\n')
            sys.stdout.flush()
            print("a warning", file=sys.stderr, flush=True)
            return 0
        if command == "fail":
            emit(progress=0.5, message="half way")
            emit(error="Cohort table 'c.csv' has no 'age' column")
            return 2
        if command == "crash":
            print("Traceback (most recent call last):", file=sys.stderr, flush=True)
            print("ZeroDivisionError: division by zero", file=sys.stderr, flush=True)
            return 3
        if command == "whoami":
            import neuroatrophy

            emit(progress=1.0, message=os.path.dirname(os.path.abspath(neuroatrophy.__file__)))
            return 0
        if command in ("hang", "stubborn"):
            if command == "stubborn":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            emit(progress=0.1, message=f"pids {os.getpid()} {grandchild.pid}")
            time.sleep(120)
            return 0
        if command == "orphan":
            grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            emit(progress=1.0, message=f"pids {os.getpid()} {grandchild.pid}")
            return 0
        print(f"unknown command {command}", file=sys.stderr)
        return 4


    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture
def fake_cli(tmp_path):
    """Folder holding the module ``fake_cli`` (run it with ``Job(..., module="fake_cli", cwd=folder)``)."""
    (tmp_path / "fake_cli.py").write_text(FAKE_CLI)
    return tmp_path


def _alive(pid: int) -> bool:
    # A zombie (exited, not yet reaped by its new parent) counts as gone.
    if Path("/proc/self/stat").exists():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_progress_events_and_logs_arrive_in_order(fake_cli):
    job = Job(["count", "4"], module="fake_cli", cwd=fake_cli)
    events = []
    returncode = job.run(on_event=events.append, interval=0.02)

    assert returncode == 0 and job.returncode == 0
    assert job.error is None and not job.cancelled and not job.running
    progress = [e for e in events if "progress" in e]
    assert [e["progress"] for e in progress] == [0.25, 0.5, 0.75, 1.0]
    assert [e["message"] for e in progress] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    logs = [e["log"] for e in events if "log" in e]
    assert sorted(logs) == ["a warning", "starting", "thread 1", "thread 2"]
    assert not any("error" in e for e in events)
    assert job.poll() == []


def test_poll_returns_everything_once_the_job_is_no_longer_running(fake_cli):
    job = Job(["count", "3"], module="fake_cli", cwd=fake_cli).start()
    events = []
    while True:
        finished = not job.running
        events += job.poll()
        if finished:
            break
        time.sleep(0.01)
    assert [e["progress"] for e in events if "progress" in e] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert job.wait(timeout=5) == 0


def test_error_line_becomes_job_error(fake_cli):
    job = Job(["fail"], module="fake_cli", cwd=fake_cli)
    events = []
    assert job.run(on_event=events.append, interval=0.02) == 2
    assert job.error == "Cohort table 'c.csv' has no 'age' column"
    assert [e for e in events if "error" in e] == [{"error": "Cohort table 'c.csv' has no 'age' column"}]
    assert {"progress": 0.5, "message": "half way"} in events


def test_nonzero_exit_without_error_line_reports_exit_code_and_stderr_tail(fake_cli):
    job = Job(["crash"], module="fake_cli", cwd=fake_cli)
    events = []
    assert job.run(on_event=events.append, interval=0.02) == 3
    assert "fake_cli crash" in job.error
    assert "exit code 3" in job.error
    assert "ZeroDivisionError: division by zero" in job.error
    assert events[-1] == {"error": job.error}


@pytest.mark.parametrize(("command", "signal_name"), [("hang", "SIGTERM"), ("stubborn", "SIGKILL")])
def test_cancel_kills_child_and_grandchild(fake_cli, command, signal_name):
    # "stubborn" ignores SIGTERM: the cancel must escalate to SIGKILL.
    job = Job([command], module="fake_cli", cwd=fake_cli).start()
    events = []
    assert _wait_until(lambda: events.extend(job.poll()) or any("progress" in e for e in events), timeout=30)
    message = next(e["message"] for e in events if "progress" in e)
    child_pid, grandchild_pid = (int(p) for p in message.split()[1:])
    assert child_pid == job.pid
    assert _alive(child_pid) and _alive(grandchild_pid)

    job.cancel()
    returncode = job.wait(timeout=15)

    assert job.cancelled
    assert returncode == -getattr(signal, signal_name)
    assert job.error is None  # a cancel is not a failure
    assert not any("error" in e for e in job.poll())
    assert not _alive(child_pid)
    assert _wait_until(lambda: not _alive(grandchild_pid), timeout=10), "grandchild survived the cancel"


def test_stray_grandchild_holding_the_output_is_killed_after_the_command_exits(fake_cli, monkeypatch):
    monkeypatch.setattr(jobs, "_STRAY_OUTPUT_WAIT_S", 0.5)
    job = Job(["orphan"], module="fake_cli", cwd=fake_cli)
    events = []
    started = time.monotonic()
    assert job.run(on_event=events.append, interval=0.02) == 0
    assert time.monotonic() - started < 20
    assert job.error is None and not job.cancelled
    grandchild_pid = int(next(e["message"] for e in events if "progress" in e).split()[2])
    assert _wait_until(lambda: not _alive(grandchild_pid), timeout=10)


def test_cancel_after_the_end_changes_nothing(fake_cli):
    job = Job(["count", "1"], module="fake_cli", cwd=fake_cli)
    job.run(interval=0.02)
    job.cancel()
    assert not job.cancelled and job.returncode == 0


def test_wait_times_out_while_running(fake_cli):
    job = Job(["hang"], module="fake_cli", cwd=fake_cli).start()
    try:
        with pytest.raises(TimeoutError, match="fake_cli hang"):
            job.wait(timeout=0.2)
        assert job.running and job.returncode is None
    finally:
        job.cancel()
        job.wait(timeout=15)


def test_child_imports_this_neuroatrophy_package(fake_cli):
    # The venv's base interpreter does not see the venv's site-packages, so the child can only
    # import neuroatrophy through the PYTHONPATH the job sets.
    python = getattr(sys, "_base_executable", sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    job = Job(["whoami"], python=python, env=env, module="fake_cli", cwd=fake_cli)
    events = []
    assert job.run(on_event=events.append, interval=0.02) == 0, job.error
    reported = next(e["message"] for e in events if "progress" in e)
    assert Path(reported) == Path(neuroatrophy.__file__).resolve().parent


def test_environment_keeps_existing_pythonpath():
    job = Job(["fit"], env={"PYTHONPATH": "/opt/extra", "HOME": "/home/x"})
    assert job.env["PYTHONPATH"] == f"{package_root()}{os.pathsep}/opt/extra"
    assert job.env["HOME"] == "/home/x"
    assert job.env["PYTHONUNBUFFERED"] == "1"


def test_command_line_appends_progress_protocol():
    job = Job(["fit", "--cohort", Path("c.csv")], python="/usr/bin/python-x")
    assert job.command == ["/usr/bin/python-x", "-m", "neuroatrophy", "fit", "--cohort", "c.csv", *PROGRESS_ARGS]
    assert PROGRESS_ARGS == ("--progress", "json")


def test_bad_arguments_and_missing_interpreter(tmp_path):
    with pytest.raises(ValueError, match="sequence"):
        Job("fit --cohort c.csv")
    missing = tmp_path / "no-python"
    with pytest.raises(FileNotFoundError, match="no-python"):
        Job(["fit"], python=missing).start()
    with pytest.raises(RuntimeError, match="not started"):
        Job(["fit"]).wait()


def test_start_twice_is_refused(fake_cli):
    job = Job(["count", "1"], module="fake_cli", cwd=fake_cli).start()
    with pytest.raises(RuntimeError, match="already started"):
        job.start()
    assert job.wait(timeout=15) == 0


# ------------------------------------------------------------------ the real neuroatrophy command


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """A tiny demo cohort written as a cohort table and a FreeSurfer-like subjects folder."""
    from neuroatrophy.demo import make_demo_cohort, write_demo_cohort

    cohort = make_demo_cohort(n_controls=30, n_patients=1, n_sites=2, seed=5)
    return write_demo_cohort(cohort, tmp_path_factory.mktemp("demo"))


def test_neuroatrophy_fit_job_reports_progress_and_writes_the_model(demo_folder, tmp_path):
    from neuroatrophy.surface import DK_NAMES
    from neuroatrophy.thickness_model import CorticalThicknessModel

    out = tmp_path / "model.npz"
    job = Job(["fit", "--cohort", demo_folder / "cohort.csv", "--subjects-dir", demo_folder / "subjects",
               "--out", out])
    events = []
    assert job.run(on_event=events.append, interval=0.05) == 0, job.error

    progress = [e for e in events if "progress" in e]
    assert len(progress) >= 2
    assert all(0.0 <= e["progress"] <= 1.0 and isinstance(e["message"], str) for e in progress)
    assert progress[-1]["progress"] == 1.0
    # Every JSON line the command printed was understood as part of the protocol.
    assert not any(e.get("log", "").lstrip().startswith("{") for e in events)
    assert job.error is None
    model = CorticalThicknessModel.load(out)
    assert model.region_names == list(DK_NAMES)


def test_neuroatrophy_error_becomes_job_error(tmp_path):
    missing = tmp_path / "missing-cohort.csv"
    job = Job(["fit", "--cohort", missing, "--out", tmp_path / "model.npz"])
    events = []
    assert job.run(on_event=events.append, interval=0.05) == 2
    assert "missing-cohort.csv" in job.error
    assert {"error": job.error} in events
    assert not (tmp_path / "model.npz").exists()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"progress": 0.42, "message": "fitting normative model: 2/5 chunks"}',
         [{"progress": 0.42, "message": "fitting normative model: 2/5 chunks"}]),
        ('{"progress": 1}', [{"progress": 1.0, "message": ""}]),
        ('{"progress": 1.7, "message": "x"}', [{"progress": 1.0, "message": "x"}]),
        ('  {"error": "boom"}  ', [{"error": "boom"}]),
        ('{"message": "reading 40 subjects"}', [{"log": "reading 40 subjects"}]),
        # Two objects glued on one line by concurrent writers: both are understood.
        ('{"progress": 0.1, "message": "a"}{"message": "b"} {"error": "c"}',
         [{"progress": 0.1, "message": "a"}, {"log": "b"}, {"error": "c"}]),
        ('{"progress": "soon"}', [{"log": '{"progress": "soon"}'}]),
        ('{"progress": NaN}', [{"log": '{"progress": NaN}'}]),
        ('{"other": 1}', [{"log": '{"other": 1}'}]),
        ('{"progress": 0.1}trailing text', [{"log": '{"progress": 0.1}trailing text'}]),
        ("{not json}", [{"log": "{not json}"}]),
        ("[1, 2]", [{"log": "[1, 2]"}]),
        ("Reading 12 subjects", [{"log": "Reading 12 subjects"}]),
        ("", []),
        ("   ", []),
    ],
)  # fmt: skip
def test_parse_output_line(line, expected):
    assert parse_output_line(line) == expected
