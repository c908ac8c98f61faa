"""The calm console of pipeline runs: stage lines and real warnings on the terminal, the noise in the log."""

import io
import logging


def test_noise_goes_to_the_run_log_and_stage_lines_to_the_terminal(tmp_path):
    import ray  # noqa: F401  (configures Ray's logging: its handlers exist before the run, as in a pipeline)

    from flows.console import LOG_FILE, _prefect_console_handlers, calm_console

    term = io.StringIO()
    ray_handler = logging.StreamHandler(io.StringIO())
    logging.getLogger("ray").addHandler(ray_handler)
    try:
        with calm_console(str(tmp_path), stream=term) as path:
            logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster")
            logging.getLogger("prefect.task_runs").info("train: epoch 1/15, loss 2.067")
            progress = logging.getLogger("fermine.progress")
            progress.info("finished teacher", extra={"event": "finished", "stage": "teacher", "seconds": 25.0})
            progress.info("reused align", extra={"event": "reused", "stage": "align"})
            progress.info("finished student", extra={"event": "finished", "stage": "student", "seconds": 9.0,
                                                     "waited": 40.0})
            # Bookkeeping stages and a second chain's reuse of a stage computed in this run: no line.
            for event, stage in (("finished", "evaluate-teacher"), ("finished", "pt.eval-pt-30"),
                                 ("reused", "teacher")):
                progress.info(stage, extra={"event": event, "stage": stage, "seconds": 1.0})
            progress.info("failed", extra={"event": "failed", "stage": "evaluate-das", "error": "no rows"})
            logging.getLogger("fermine.steps").warning("no face in 3 images: skipped")
            # the terminal's handlers pass warnings and errors, not INFO
            assert all(h.level == logging.WARNING for h in _prefect_console_handlers())
        logging.getLogger("ray").warning("after the run")  # everything is restored afterwards
        assert "after the run" in ray_handler.stream.getvalue()
    finally:
        logging.getLogger("ray").removeHandler(ray_handler)
    assert path == str(tmp_path / LOG_FILE)
    log = (tmp_path / LOG_FILE).read_text()
    assert "Token authentication" in log and "epoch 1/15" in log and "no face in 3 images" in log
    assert "Token authentication" not in ray_handler.stream.getvalue()  # muted on the console
    lines = term.getvalue().splitlines()
    assert lines == [f"  done    {'teacher':<32}     25 s", "  reused  align",
                     f"  done    {'student':<32}      9 s (after 40 s waiting for resources)",
                     "  FAILED  evaluate-das: no rows"]
