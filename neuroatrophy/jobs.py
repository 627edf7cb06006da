"""Run a ``neuroatrophy`` command in a subprocess, with progress and cancel.

The GUI must never block on a long computation (fitting a normative model takes
minutes), and a computation running in the GUI process cannot be stopped
cleanly. A :class:`Job` therefore runs the command line tool in a child
process, reads its output on background threads and hands it over as events
when asked (:meth:`Job.poll`), so the caller decides when to look: Slicer polls
from a ``qt.QTimer``, a script simply calls :meth:`Job.run`. Nothing here needs
Qt.

Progress protocol
-----------------
The command is run with ``--progress json``. It then prints one JSON object per
line on stdout::

    {"progress": 0.42, "message": "fitting normative model: 2/5 chunks"}

and on failure ``{"error": "<message>"}`` followed by exit code 2. A JSON line
with only a message, ``{"message": "reading 40 subjects"}``, is a log line, as is
every other line (stdout or stderr).

Events
------
:meth:`Job.poll` returns a list of dicts, each one of

* ``{"progress": float, "message": str}``: fraction done (0..1) and what is being done;
* ``{"log": str}``: any other output line;
* ``{"error": str}``: the command reported an error, or exited abnormally.

Examples
--------
>>> job = Job(["fit", "--cohort", "cohort.csv", "--out", "model.npz"])  # doctest: +SKIP
>>> returncode = job.run(on_event=print)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["Job", "PROGRESS_ARGS", "package_root", "parse_output_line"]

#: Arguments appended to every command line to select the JSON progress protocol.
PROGRESS_ARGS = ("--progress", "json")

# Seconds between the polite termination request and the hard kill on cancel.
_KILL_GRACE_S = 2.0
# Seconds to wait, once the command has exited, for processes it left behind to
# release its output before they are killed.
_STRAY_OUTPUT_WAIT_S = 5.0
# Lines of stderr kept to explain an abnormal exit.
_STDERR_TAIL_LINES = 20


def package_root() -> Path:
    """Folder that contains the ``neuroatrophy`` package (put on the child's ``PYTHONPATH``)."""
    return Path(__file__).resolve().parent.parent


class Job:
    """A ``neuroatrophy`` command running in a child process.

    The command line is ``[python, "-m", module, *args, "--progress", "json"]``.
    The child runs in its own process group (POSIX: new session; Windows: new
    process group) so that :meth:`cancel` stops it together with every process
    it started (joblib workers, for example). Processes that outlive the command
    while holding its output open are killed a few seconds after it exits.

    Parameters
    ----------
    args : sequence of str
        Command arguments, e.g. ``["fit", "--cohort", "c.csv", "--out", "m.npz"]``.
    python : str or path-like, optional
        Python interpreter. Defaults to ``sys.executable``; inside Slicer pass the
        ``PythonSlicer`` launcher (``sys.executable`` is the Slicer application there).
    env : mapping, optional
        Complete environment of the child (default: a copy of ``os.environ``).
        The folder holding this ``neuroatrophy`` package is prepended to its
        ``PYTHONPATH`` so the child runs the same code as the caller.
    cwd : str or path-like, optional
        Working directory of the child.
    module : str
        Python module run with ``-m``. Defaults to ``"neuroatrophy"``; any module
        that speaks the progress protocol works (tests use their own).

    Attributes
    ----------
    command : list of str
        The full command line.
    """

    def __init__(self, args, python=None, env=None, cwd=None, module: str = "neuroatrophy"):
        if isinstance(args, (str, bytes)):
            raise ValueError("args must be a sequence of arguments, not a single string")
        self.args = [str(a) for a in args]
        self.python = str(python) if python else sys.executable
        self.module = str(module)
        self.cwd = str(cwd) if cwd is not None else None
        self.env = _child_environment(env)
        self.command = [self.python, "-m", self.module, *self.args, *PROGRESS_ARGS]

        self._process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._finished = threading.Event()
        self._stderr_tail: collections.deque = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._cancelled = False
        self._error: str | None = None
        self._returncode: int | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state

    @property
    def started(self) -> bool:
        """True once :meth:`start` has launched the child."""
        return self._process is not None

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the child has exited and all its output is read.

        Once ``running`` is False, the next :meth:`poll` returns every remaining event.
        """
        return self.started and not self._finished.is_set()

    @property
    def returncode(self) -> int | None:
        """Exit code of the child (negative: killed by that signal on POSIX); None while running."""
        return self._returncode

    @property
    def cancelled(self) -> bool:
        """True if :meth:`cancel` was called while the job was running."""
        return self._cancelled

    @property
    def error(self) -> str | None:
        """Last error message reported by the command, or explaining an abnormal exit; None if none."""
        return self._error

    @property
    def pid(self) -> int | None:
        """Process id of the child (None before :meth:`start`)."""
        return self._process.pid if self._process is not None else None

    # ---------------------------------------------------------------- control

    def start(self) -> Job:
        """Launch the child process; returns ``self``.

        Raises
        ------
        RuntimeError
            If the job was already started.
        FileNotFoundError
            If the Python interpreter does not exist.
        """
        if self.started:
            raise RuntimeError("This job was already started; create a new Job to run the command again")
        try:
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                env=self.env,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **_new_process_group_options(),
            )
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"Cannot start job: Python interpreter not found: {self.python}") from exc
        readers = [
            threading.Thread(target=self._read_stdout, name="neuroatrophy-job-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="neuroatrophy-job-stderr", daemon=True),
        ]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._monitor, args=(readers,), name="neuroatrophy-job-monitor", daemon=True).start()
        return self

    def poll(self) -> list[dict]:
        """Events received since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def cancel(self) -> None:
        """Stop the child and every process it started; does nothing if the job is not running.

        Asks politely first (SIGTERM to the process group on POSIX), then kills
        the whole group after a short grace period. Returns at once; use
        :meth:`wait` to wait for the end.
        """
        with self._lock:
            if not self.running:
                return
            self._cancelled = True
        _terminate_tree(self._process)
        threading.Thread(target=self._kill_after_grace, name="neuroatrophy-job-kill", daemon=True).start()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child has exited and its output is read; returns the exit code.

        Raises
        ------
        RuntimeError
            If the job was not started.
        TimeoutError
            If ``timeout`` seconds pass first.
        """
        if not self.started:
            raise RuntimeError("The job was not started; call start() first")
        if not self._finished.wait(timeout):
            raise TimeoutError(f"Job '{self._name()}' still running after {timeout} s")
        return self._returncode

    def run(self, on_event=None, interval: float = 0.1) -> int:
        """Start the job (if needed) and block until it ends, passing each event to ``on_event``.

        Parameters
        ----------
        on_event : callable, optional
            Called with each event dict, in order, from the calling thread.
        interval : float
            Seconds between polls.

        Returns
        -------
        int
            Exit code; check :attr:`error` for the reason of a failure.
        """
        if not self.started:
            self.start()
        while True:
            finished = not self.running  # read before polling: then every event is already queued
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if finished:
                return self._returncode
            self._finished.wait(interval)

    # -------------------------------------------------------------- internals

    def _read_stdout(self) -> None:
        for line in iter(self._process.stdout.readline, ""):
            for event in parse_output_line(line.rstrip("\r\n")):
                if "error" in event:
                    self._error = event["error"]
                self._events.put(event)
        self._process.stdout.close()

    def _read_stderr(self) -> None:
        for line in iter(self._process.stderr.readline, ""):
            line = line.rstrip("\r\n")
            if line:
                self._stderr_tail.append(line)
                self._events.put({"log": line})
        self._process.stderr.close()

    def _monitor(self, readers) -> None:
        returncode = self._process.wait()
        for reader in readers:
            reader.join(_STRAY_OUTPUT_WAIT_S)
        if any(reader.is_alive() for reader in readers):
            # The command exited but processes it started still hold its output open:
            # they belong to the job, which is over, so they go too.
            _kill_tree(self._process)
            for reader in readers:
                reader.join()
        self._returncode = returncode
        if returncode != 0 and not self._cancelled:
            # An error line already explains exit code 2; anything else gets the stderr tail.
            if self._error is None or returncode != 2:
                self._error = self._explain_exit(returncode, reported=self._error)
                self._events.put({"error": self._error})
        self._finished.set()

    def _name(self) -> str:
        return " ".join([self.module, *self.args[:1]])

    def _explain_exit(self, returncode: int, reported: str | None) -> str:
        if returncode < 0:
            message = f"Job '{self._name()}' was killed by signal {-returncode}"
        else:
            message = f"Job '{self._name()}' failed with exit code {returncode}"
        if reported:
            message += f": {reported}"
        if self._stderr_tail:
            message += "\nLast output:\n" + "\n".join(self._stderr_tail)
        else:
            message += " (no error output)"
        return message

    def _kill_after_grace(self) -> None:
        try:
            self._process.wait(_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        # Kill the group even if the child itself exited: its own children may not have.
        _kill_tree(self._process)


def parse_output_line(line: str) -> list[dict]:
    """The events of one stdout line of a job.

    A line made of protocol objects gives their events (several objects glued on
    one line, as concurrent writers can produce, each give one); any other
    non-empty line is a log event.

    >>> parse_output_line('{"progress": 0.5, "message": "half way"}')
    [{'progress': 0.5, 'message': 'half way'}]
    >>> parse_output_line('{"message": "reading 40 subjects"}')
    [{'log': 'reading 40 subjects'}]
    >>> parse_output_line("reading subjects")
    [{'log': 'reading subjects'}]
    """
    text = line.strip()
    if not text:
        return []
    events = _protocol_events(text)
    return events if events is not None else [{"log": line.rstrip()}]


def _protocol_events(text: str) -> list[dict] | None:
    decoder = json.JSONDecoder()
    events, position = [], 0
    while position < len(text):
        if text[position] != "{":
            return None
        try:
            payload, position = decoder.raw_decode(text, position)
        except ValueError:
            return None
        event = _protocol_event(payload)
        if event is None:
            return None
        events.append(event)
        while position < len(text) and text[position].isspace():
            position += 1
    return events


def _protocol_event(payload) -> dict | None:
    if not isinstance(payload, dict):
        return None
    if "error" in payload:
        return {"error": str(payload["error"])}
    if "progress" in payload:
        try:
            fraction = float(payload["progress"])
        except (TypeError, ValueError):
            return None
        if fraction != fraction:  # NaN
            return None
        return {"progress": min(max(fraction, 0.0), 1.0), "message": str(payload.get("message", ""))}
    if "message" in payload:
        return {"log": str(payload["message"])}
    return None


def _child_environment(env) -> dict:
    environment = dict(os.environ if env is None else env)
    root = str(package_root())
    existing = environment.get("PYTHONPATH", "")
    environment["PYTHONPATH"] = root + (os.pathsep + existing if existing else "")
    # Progress lines must arrive when printed, not when a buffer fills.
    environment["PYTHONUNBUFFERED"] = "1"
    environment["PYTHONIOENCODING"] = "utf-8"
    return environment


def _new_process_group_options() -> dict:
    if os.name == "nt":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        return {"creationflags": flags}
    return {"start_new_session": True}


def _terminate_tree(process: subprocess.Popen) -> None:
    if os.name == "nt":
        _kill_tree(process)  # Windows has no polite request a console-less child would see
        return
    _signal_group(process.pid, signal.SIGTERM)


def _kill_tree(process: subprocess.Popen) -> None:
    if os.name != "nt":
        _signal_group(process.pid, signal.SIGKILL)
        return
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(process.pid)
            family = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            return
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        return
    subprocess.run(
        ["taskkill", "/T", "/F", "/PID", str(process.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
        check=False,
    )


def _signal_group(pgid: int, signum: int) -> None:
    # start_new_session made the child a group leader: its pid is the group id.
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group is already gone
