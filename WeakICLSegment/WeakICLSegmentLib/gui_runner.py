"""Running long work from the Widget without freezing Slicer (desktop application only: needs Qt).

`run_job`: a `scene_logic.Job`'s `compute` on a worker thread (the engine only: no MRML node is touched
there), polled by a QTimer on the main thread that feeds a progress dialog and passes Cancel on through
the progress callback; `apply` (the MRML writes) then runs on the main thread.
`run_commands`: `python -m ...` command lines one after another in a QProcess (pip installs).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Union

import qt
import slicer
from weakicl.errors import Cancelled

from .dependencies import python_launcher
from .scene_logic import Job

POLL_MILLISECONDS = 100
Command = Union[list[str], Callable[[], Optional[list[str]]]]  # a callable is built when its turn comes


def run_job(job: Job, finished: Callable[[Optional[BaseException], object], None], modal: bool = True) -> None:
    """Compute on a worker thread under a cancellable progress dialog; then, on the main thread,
    `finished(error, result)`: error is the exception compute raised (Cancelled included), or None.

    `modal` blocks the whole application; without it the slice views stay live (corrections placed
    meanwhile are queued by the Widget, whose panel is disabled while the job runs)."""
    dialog = slicer.util.createProgressDialog(windowTitle=job.title, labelText=f"{job.title}...", maximum=1000)
    dialog.setWindowModality(qt.Qt.ApplicationModal if modal else qt.Qt.NonModal)
    dialog.autoClose = dialog.autoReset = False  # phases that report 1.0 must not hide it
    dialog.setCancelButtonText("Cancel")
    state = {"fraction": 0.0, "message": f"{job.title}...", "cancel": False, "result": None, "error": None}

    def report(fraction: float, message: str) -> None:  # worker thread: plain data only
        state["fraction"], state["message"] = fraction, message
        if state["cancel"]:
            raise Cancelled(f"{job.title} cancelled")

    def work() -> None:
        try:
            state["result"] = job.compute(report)
        except BaseException as error:  # handed to the main thread
            state["error"] = error

    worker = threading.Thread(target=work, name=f"WeakICLSegment {job.title}", daemon=True)
    timer = qt.QTimer(dialog)
    timer.setInterval(POLL_MILLISECONDS)

    def poll() -> None:
        state["cancel"] = state["cancel"] or dialog.wasCanceled
        dialog.labelText = state["message"]
        dialog.value = min(int(999 * max(0.0, min(state["fraction"], 1.0))), 999)
        if worker.is_alive():
            return
        timer.stop()
        dialog.close()
        finished(state["error"], state["result"])

    timer.timeout.connect(poll)
    worker.start()
    timer.start()


class CommandRunner:
    """Python-module command lines run one after another in a QProcess: the GUI stays live. Raises
    RuntimeError at construction when Slicer's Python launcher cannot be found."""

    def __init__(self, commands: list[Command], finished: Callable[[bool, str], None],
                 started: Callable[[list[str]], None] = lambda command: None) -> None:
        self._python = python_launcher()
        self._commands = list(commands)
        self._finished, self._started = finished, started
        self._process: Optional[qt.QProcess] = None

    def start(self, exitCode: int = 0, exitStatus=None) -> None:
        if exitCode != 0 or not self._commands:
            output = bytes(self._process.readAll()).decode(errors="replace") if self._process else ""
            self._finished(exitCode == 0, output)
            return
        command = self._commands.pop(0)
        command = command() if callable(command) else command
        if command is None:
            self.start()
            return
        self._started(command)
        self._process = qt.QProcess()
        self._process.setProcessChannelMode(qt.QProcess.MergedChannels)
        self._process.connect("finished(int,QProcess::ExitStatus)", self.start)
        self._process.start(self._python, ["-m", *command])
