"""A calm console for pipeline runs: one line per stage, real warnings and errors, then the results.

While a pipeline runs (`fermine run`, `fermine demo`), everything that is only of interest when
something goes wrong goes to ``<run>/logs/run.log`` instead of the terminal: Prefect's per-task INFO
lines and server notices, Ray's start-up warnings, Python warnings raised by libraries. The terminal
shows one line per stage as it finishes (or is reused), and every WARNING or ERROR fermine's own
loggers write. Prefect still ships its run logs to its API, so the UI shows them all. Ray actors'
output (TensorFlow banners from the aligners) stays in Ray's session logs: actors' errors reach the
driver as exceptions (RaySection.log_to_driver).
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

PROGRESS_LOGGER = "fermine.progress"  # flows.stage reports stage events here
LOG_FILE = "logs/run.log"
# Loggers whose records go to the run's log file (INFO and up).
_FILE_LOGGERS = ("prefect", "fermine", "ray", "py.warnings", "absl", "tensorflow", "distributed")
# Third-party loggers whose console output is muted to errors during a run.
_MUTED = ("ray", "absl", "tensorflow", "py.warnings")


# Bookkeeping stages (a model's evaluation, a figure, an erased or noisy copy of a table, PT's
# filtered-samples report) get no console line: their results are in the tables printed at the end,
# their records in `fermine status` and the run's log. A failure of one is always shown.
_QUIET = ("evaluate-", "eval-", "figure-", "noise-", "pt-report-", "erase-")


def _quiet(stage: str) -> bool:
    return stage.rsplit(".", 1)[-1].startswith(_QUIET)  # "pt.eval-pt-30" -> "eval-pt-30"


class _StageLines(logging.Handler):
    """Formats flows.stage's events as one line each: '  done  teacher  25 s': the seconds it computed,
    and those it first waited for a worker with its resources when that was a second or more."""

    def __init__(self, stream=None):
        super().__init__(logging.INFO)
        self.stream = stream or sys.stderr
        self.done: set[str] = set()  # stages computed in this run: another chain's reuse is no news

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event not in ("finished", "reused", "failed"):
            return
        name = getattr(record, "stage", "?")
        if event != "failed" and (_quiet(name) or (event == "reused" and name in self.done)):
            return
        if event == "finished":
            self.done.add(name)
        if event == "finished":
            waited = getattr(record, "waited", 0.0)
            text = f"  done    {name:<32} {getattr(record, 'seconds', 0.0):6.0f} s" + (
                f" (after {waited:.0f} s waiting for resources)" if waited >= 1 else "")
        elif event == "reused":
            text = f"  reused  {name}"
        else:
            text = f"  FAILED  {name}: {getattr(record, 'error', '')}"
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed terminal must not fail the run
            pass


class _NoRunFailures(logging.Filter):
    """Drops Prefect's task- and flow-run failure records (a traceback each) from the console: the
    stage's FAILED line and the command's one-line error say it; the log file keeps them whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.name.startswith(("prefect.task_runs",
                                                                                  "prefect.flow_runs")))


def run_log_path(run_uri: str) -> str | None:
    """The run's log file on this machine's file system (None for a remote run folder or before the run
    has one)."""
    local = _local_dir(run_uri)
    if local is None:
        return None
    path = os.path.join(local, LOG_FILE)
    return path if os.path.isdir(os.path.dirname(path)) else None


def _local_dir(uri: str) -> str | None:
    if "://" in uri and not uri.startswith("file://"):
        return None
    return uri.removeprefix("file://")


def _prefect_console_handlers() -> list[logging.Handler]:
    try:
        from prefect.logging.handlers import PrefectConsoleHandler
    except ImportError:  # pragma: no cover - prefect is a dependency
        return []
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)]


@contextmanager
def calm_console(run_uri: str, stream=None) -> Iterator[str | None]:
    """Route third-party noise to ``<run>/logs/run.log`` for the duration; yields that path (None for a
    remote run folder, whose noise then goes nowhere but Prefect's API)."""
    # Imported first so that their logging handlers exist and can be adjusted below (both are imported by
    # every pipeline anyway).
    import prefect.logging  # noqa: F401
    import ray  # noqa: F401

    local = _local_dir(run_uri)
    path = None
    file_handler: logging.Handler | None = None
    if local is not None:
        path = os.path.join(local, LOG_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved: list[tuple[logging.Handler, int]] = []
    quiet_failures = _NoRunFailures()
    prefect_handlers = _prefect_console_handlers()
    for h in prefect_handlers:  # Prefect's console lines: warnings and errors only, run failures once
        saved.append((h, h.level))
        h.setLevel(logging.WARNING)
        h.addFilter(quiet_failures)
    for name in _MUTED:
        for h in logging.getLogger(name).handlers:
            saved.append((h, h.level))
            h.setLevel(logging.ERROR)
    levels: list[tuple[logging.Logger, int]] = []
    if file_handler is not None:
        for name in _FILE_LOGGERS:
            lg = logging.getLogger(name)
            lg.addHandler(file_handler)
            if lg.getEffectiveLevel() > logging.INFO:
                levels.append((lg, lg.level))
                lg.setLevel(logging.INFO)
    progress = logging.getLogger(PROGRESS_LOGGER)
    stage_lines = _StageLines(stream)
    progress.addHandler(stage_lines)
    progress_level = progress.level
    progress.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings: to py.warnings, i.e. the log file
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        progress.removeHandler(stage_lines)
        progress.setLevel(progress_level)
        for h in prefect_handlers:
            h.removeFilter(quiet_failures)
        for h, level in saved:
            h.setLevel(level)
        for lg, level in levels:
            lg.setLevel(level)
        if file_handler is not None:
            for name in _FILE_LOGGERS:
                logging.getLogger(name).removeHandler(file_handler)
            file_handler.close()
