"""The run report (flows/report.py): a tiny run folder built with the stages' own figure functions,
checked as HTML and in a real headless browser (chromium), which the test setup installs with apt
when it is missing so that CI runs it too."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flows.report import build_report
from flows.results import ResultsTable, publish_results
from flows.stage import Run
from storage.images import decode
from storage.schema import CLASSES

# ---- a tiny run ---------------------------------------------------------------------------------
HISTORY = [{"epoch": e, "loss": 2.0 / e, "train_acc": 0.2 * e, "val_accuracy": 0.18 * e, "lr": 0.01} for e in (1, 2, 3)]
CONF = np.diag([5, 4, 3, 6, 7, 2, 3]) + 1


def _faces(n: int, seed: int) -> list[np.ndarray]:
    r = np.random.default_rng(seed)
    return [r.integers(0, 255, (24, 24, 3), dtype=np.uint8) for _ in range(n)]


def grid(name: str, rows: int, cols: int):
    """A stage body drawing a grid (module level: a rerun builds the same body, with the same code version)."""
    def fn(out: str) -> None:
        from tasks.figures import image_grid

        os.makedirs(out, exist_ok=True)
        image_grid([_faces(cols, rows * 10 + i) for i in range(rows)], f"{out}/{name}")
    return fn


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from tasks.evaluate import EvalResult
    from tasks.plots import plot_confusion, plot_curves

    root = tmp_path_factory.mktemp("runs") / "tiny"
    run = Run(str(root))
    (root / "config.json").write_text(json.dumps({"name": "tiny <run>", "seed": 0}, indent=2))

    def teacher(out: str) -> None:  # what tasks.train writes beside the checkpoint
        plot_curves(HISTORY, f"{out}/curves.png", title="teacher")
        plot_confusion(CONF, CLASSES, f"{out}/val_confusion.png", title="teacher val")

    def evaluate(out: str) -> None:  # flows.steps.evaluate
        plot_confusion(CONF.T, CLASSES, f"{out}/confusion-inner.png", title="inner")


    def attack_fails(out: str) -> None:
        raise RuntimeError("actor died: out of GPU memory")

    t = run.stage("teacher", {"epochs": 3}, {}, teacher)
    run.stage("evaluate-teacher", {"sets": ["inner"]}, {"model": t.uri}, evaluate)
    run.stage("figure-pasm", {"rows": 2}, {}, grid("pasm-rounds.png", 2, 3))
    run.stage("mine", {"margin": 0.1}, {}, grid("mined-samples.png", 7, 2))
    run.stage("distill", {"images_per_class": 1}, {}, grid("distilled.png", 1, 4))
    with pytest.raises(RuntimeError):
        run.stage("attack-r2", {"population": 4}, {}, attack_fails)

    results = ResultsTable()
    results.add("teacher", {"inner": EvalResult.from_confusion(CONF, CLASSES).to_dict()})
    publish_results(run, SimpleNamespace(name="tiny <run>", report=False), results, {}, {})
    return root


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return Path(build_report(str(run_dir)))


def _sections(page: str) -> dict[str, str]:
    """h2 id -> the HTML up to the next h2."""
    parts = re.split(r'(?=<h2 id=")', page)
    return {re.match(r'<h2 id="([^"]+)"', p).group(1): p for p in parts if p.startswith("<h2 id=")}


# ---- the HTML itself ----------------------------------------------------------------------------
def test_figures_are_grouped_and_embedded(report, run_dir):
    page = report.read_text()
    sec = _sections(page)
    counts = {k: v.count("<img ") for k, v in sec.items()}
    assert counts == {"results": 0, "per-class": 0, "stages": 0, "timeline": 0, "curves": 1, "confusion": 2, "attack": 1,
                      "mined": 1, "distilled": 1, "config": 0}
    assert "other" not in sec  # every figure the stages write has its own section
    assert "val_confusion.png" in sec["confusion"] and "confusion-inner.png" in sec["confusion"]
    # Self-contained: every image is a data URI holding exactly the stage's PNG; nothing is fetched.
    srcs = re.findall(r'<img alt="([^"]+)" src="([^"]+)"', page)
    assert len(srcs) == 6
    for name, src in srcs:
        assert src.startswith("data:image/png;base64,")
        (png,) = run_dir.glob(f"*/{name}")
        assert base64.b64decode(src.split(",", 1)[1]) == png.read_bytes()
        assert decode(png.read_bytes()).shape[2] == 3
    assert not re.search(r'(src|href)="(https?:|file:|//)', page)


def test_stages_results_and_config(report):
    sec = _sections(report.read_text())
    stages = sec["stages"]
    for name in ("teacher", "evaluate-teacher", "figure-pasm", "mine", "distill", "attack-r2"):
        assert f"<td>{name}</td>" in stages
    assert "<td>failed</td>" in stages and "actor died: out of GPU memory" in stages
    assert stages.count("<td>finished</td>") == 5
    assert re.search(r"<td>\d+ KB</td>", stages)  # artifact sizes (the PNGs)
    assert "6 stages" in stages
    # The timeline: one bar per computed stage (the failed one has none), in the flow process's band.
    assert sec["timeline"].count("<rect") == 5 and "flow process" in sec["timeline"]
    acc = float(np.trace(CONF) / CONF.sum())
    assert f"{acc:.4f}" in sec["results"] and "inner accuracy" in sec["results"]
    happy = CONF[4, 4] / CONF[4].sum()  # of the faces that are happy, the share predicted happy
    assert "<th>happy</th>" in sec["per-class"] and f"{happy:.4f}" in sec["per-class"]
    assert "tiny &lt;run&gt;" in sec["config"] and "<run>" not in report.read_text()


def test_a_rerun_reuses_and_still_shows_durations(run_dir, tmp_path):
    run = Run(str(run_dir))
    # The same stage body as the fixture's (a stage's identity includes its code); it must not run again.
    rec = run.stage("distill", {"images_per_class": 1}, {}, grid("distilled.png", 1, 4))
    assert rec.reused
    page = Path(build_report(str(run_dir), str(tmp_path / "r.html"))).read_text()
    row = re.search(r"<tr><td>distill</td><td>reused</td><td class=\"num\">[\d.]+</td>", page)
    assert row, "a reused stage shows the duration of the run that computed it"


def test_not_a_run_folder_and_cli(run_dir, tmp_path, capsys):
    from flows.cli import main

    with pytest.raises(FileNotFoundError, match="not a fermine run folder"):
        build_report(str(tmp_path / "empty"))
    assert not (tmp_path / "empty").exists()  # a typo leaves no empty run folder behind
    main(["report", str(run_dir), "--out", str(tmp_path / "cli.html")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli.html")
    assert (tmp_path / "cli.html").read_text().startswith("<!doctype html>")
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "nothing-here")])
    assert e.value.code == 2


# ---- in a real browser --------------------------------------------------------------------------
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_browser() -> str | None:
    if os.environ.get("FERMINE_CHROMIUM"):
        return os.environ["FERMINE_CHROMIUM"]
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _install_chromium() -> str:
    """apt-get install chromium (Debian's package). Returns "" on success, else why it cannot be done."""
    apt = shutil.which("apt-get")
    if apt is None:
        return "no apt-get on this machine (not Debian/Ubuntu): install chromium or set FERMINE_CHROMIUM"
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], check=False, capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        return "chromium is missing and installing it needs root or passwordless sudo"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # another process (a parallel test run) may hold apt's lock
    for cmd in ([apt, *lock, "update"], [apt, *lock, "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            p = subprocess.run(prefix + cmd, check=False, capture_output=True, text=True, timeout=1200, env=env)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` ran for over 20 minutes"
        if p.returncode != 0:
            return f"`{' '.join(cmd)}` failed (exit {p.returncode}): {(p.stderr or p.stdout)[-600:]}"
    return ""


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = _find_browser()
    if exe is None:
        t0 = time.time()
        why = _install_chromium()
        if why:
            pytest.skip(f"cannot run the browser test: {why}")
        exe = _find_browser()
        if exe is None:
            pytest.fail("apt-get installed chromium but no chromium executable is on PATH")
        print(f"installed chromium in {time.time() - t0:.0f} s")
    return exe


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.html: dict[str, str | None] = {}
        self.imgs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "html":
            self.html = dict(attrs)
        elif tag == "img":
            self.imgs.append(dict(attrs))


def _open_in_browser(exe: str, page: Path, profile: Path) -> tuple[_Dom, list[str]]:
    """Load the page headless; return its DOM after the load event and the console lines it logged."""
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={profile}",  # own profile: parallel runs do not fight over ~/.config/chromium
           "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000",  # dump only once the page is idle (the load event has fired)
           "--dump-dom", page.resolve().as_uri()]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "<html" in p.stdout, f"chromium failed (exit {p.returncode}): {p.stderr[-2000:]}"
    dom = _Dom()
    dom.feed(p.stdout)
    # Console messages (console.*, uncaught exceptions) are logged as "...:CONSOLE(line)] "msg", source: ...".
    console = [line for line in p.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return dom, console


def test_report_renders_in_chromium(chromium, report, tmp_path):
    dom, console = _open_in_browser(chromium, report, tmp_path / "profile")
    assert console == [], "the report logged to the console:\n" + "\n".join(console)
    assert dom.html.get("data-errors") is None, f"{dom.html.get('data-errors')} script/resource errors"
    assert dom.html.get("data-images-rendered") == "6/6"
    assert len(dom.imgs) == 6 and all(img.get("data-rendered") == "1" for img in dom.imgs)


def test_browser_check_catches_broken_images_and_script_errors(chromium, report, tmp_path):
    """The control for the test above: a broken image and a throwing script are both caught."""
    page = report.read_text()
    page = re.sub(r'src="data:image/png;base64,[^"]+"', 'src="data:image/png;base64,iVBORw0KGgoAAAA"', page, count=1)
    page = page.replace("</body>", "<script>undefinedFunction()</script></body>")
    broken = tmp_path / "broken.html"
    broken.write_text(page)
    dom, console = _open_in_browser(chromium, broken, tmp_path / "profile")
    assert any("Uncaught ReferenceError: undefinedFunction" in line for line in console), console
    assert dom.html.get("data-images-rendered") == "5/6"
    assert [img.get("data-rendered") for img in dom.imgs].count("0") == 1
    assert int(dom.html.get("data-errors") or 0) >= 2  # the image and the script
