"""The inspection report: gallery, paging, grading and export in a real headless Chromium; metrics.

Chromium is driven through the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4), so the test needs Debian's ``chromium`` package and no Python driver or
chromedriver: clicks and key presses are real input events, as a person's would be.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import html
import io
import json
import math
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from scanner.metrics import (average_precision, precision_at_top, precision_recall,
                             recall_in_top_fraction)
from scanner.pipeline import read_candidates
from scanner.catalog import table_to_bytes
from scanner.layout import failure_table
from scanner.report import (ReportError, add_report_command, read_truth, render_html,
                            rgb_band_order, summarise_truth, truth_line, write_report)

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,1000", "--remote-debugging-pipe")
TOP_N = 60  # more than one page (50 per page), fewer than the tiny survey's objects


class Chromium:
    """A headless Chromium with one page, driven over the DevTools protocol on a pipe.

    Messages are JSON terminated by NUL; Chromium reads commands on fd 3 and writes on fd 4.
    """

    def __init__(self, executable: str, timeout_s: float = 20.0):
        self.timeout_s = timeout_s
        self.profile = tempfile.mkdtemp(prefix="lensscan-chromium-")
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        # High copies first, so that placing them on fds 3 and 4 never overwrites the other one.
        keep = (fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10))

        def on_fds_3_and_4() -> None:
            os.dup2(keep[0], 3)
            os.dup2(keep[1], 4)

        self.process = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=on_fds_3_and_4, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_browser, from_browser, *keep):
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.send("Target.createTarget", url="about:blank", session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True,
                                 session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._from_browser, 1 << 20) if ready else b""
            if not chunk:
                raise TimeoutError("Chromium did not answer over the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: bool = True, **params: Any) -> dict[str, Any]:
        """Run one DevTools command and return its result; protocol errors raise."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            for k, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(k)
            self.events.append(self._read_message(deadline))

    def errors(self) -> list[str]:
        """Uncaught JavaScript exceptions of the page so far."""
        return [json.dumps(e["params"]["exceptionDetails"])[:500] for e in self.events
                if e.get("method") == "Runtime.exceptionThrown"]

    def open(self, url: str) -> None:
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """Click the middle of the element with a real mouse event."""
        x, y = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                       f"e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); "
                       f"return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def press(self, key: str) -> None:
        """Type one printable key, as a keyboard would."""
        self.send("Input.dispatchKeyEvent", type="keyDown", key=key, text=key)
        self.send("Input.dispatchKeyEvent", type="keyUp", key=key)

    def screenshot(self, path: str | Path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
            self.process.wait(timeout=10)
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the report's "
                    "browser tests need it")
    chromium = Chromium(CHROMIUM)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def scan_out(tiny_scan, tmp_path_factory) -> Path:
    """A copy of the session's tiny scan: reports written here leave the reference scan as it is."""
    out = tmp_path_factory.mktemp("report") / "scan"
    shutil.copytree(tiny_scan[1], out)
    return out


@pytest.fixture(scope="module")
def report(scan_out, tiny_survey) -> str:
    return write_report(str(scan_out), truth=tiny_survey.truth_url, top_n=TOP_N)


@pytest.fixture(scope="module")
def ranked(scan_out) -> pd.DataFrame:
    """The scan's candidates in the report's order: score, highest first, then objid."""
    cand = read_candidates(str(scan_out)).to_pandas()
    return cand.sort_values(["score", "objid"], ascending=[False, True]).reset_index(drop=True)


def _open_fresh(browser: Chromium, url: str) -> None:
    """Open the report with no grades stored from an earlier test."""
    browser.open(Path(url).as_uri())
    browser.js("localStorage.clear()")
    browser.open(Path(url).as_uri())


def _cards_on_page(browser: Chromium) -> list[dict[str, Any]]:
    return browser.js("Array.from(document.querySelectorAll('#cards .card')).map(c => "
                      "({objid: c.dataset.objid, img: c.querySelector('img') !== null, "
                      "loaded: Array.from(c.querySelectorAll('img')).every(i => i.complete && "
                      "i.naturalWidth > 0)}))")


def test_gallery_pages_through_the_top_candidates_with_every_stamp_loaded(browser, report, ranked):
    _open_fresh(browser, report)
    seen: list[dict[str, Any]] = []
    per_page = []
    while True:
        cards = _cards_on_page(browser)
        per_page.append(len(cards))
        seen += cards
        if browser.js("document.getElementById('next').disabled"):
            break
        browser.click("#next")
    assert per_page == [50, TOP_N - 50]
    assert [c["objid"] for c in seen] == [str(o) for o in ranked["objid"].head(TOP_N)]
    assert all(c["img"] and c["loaded"] for c in seen)
    browser.click("#prev")
    assert len(_cards_on_page(browser)) == 50
    assert browser.errors() == []


def test_grades_marked_by_click_and_key_export_as_csv_and_survive_a_reload(browser, report, ranked,
                                                                           tmp_path):
    _open_fresh(browser, report)
    browser.click('#card-2 button[data-grade="B"]')
    browser.click("#card-6")
    browser.press("n")
    csv = browser.js("window.lensscanGradesCSV()")
    grades = pd.read_csv(io.StringIO(csv), dtype={"objid": np.int64, "tile": str})
    assert list(grades.columns) == ["objid", "ra", "dec", "tile", "score", "grade"]
    expected = ranked.iloc[[2, 6]].assign(grade=["B", "not_lens"])
    pd.testing.assert_frame_equal(grades[["objid", "tile", "grade"]].reset_index(drop=True),
                                  expected[["objid", "tile", "grade"]].reset_index(drop=True))
    np.testing.assert_allclose(grades[["ra", "dec"]], expected[["ra", "dec"]], rtol=0, atol=1e-9)
    np.testing.assert_allclose(grades["score"], expected["score"], atol=1e-6)

    browser.open(Path(report).as_uri())
    assert browser.js("window.lensscanGradesCSV()") == csv
    assert browser.js("document.querySelectorAll('.card.graded').length") == 2

    browser.send("Browser.setDownloadBehavior", session=False, behavior="allow",
                 downloadPath=str(tmp_path))
    browser.click("#export")
    download = tmp_path / "grades.csv"
    deadline = time.monotonic() + 10
    while not download.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert download.read_text() == csv
    assert browser.errors() == []


def test_report_shows_the_truth_metrics_and_the_scan_provenance(report, scan_out, default_models):
    page = Path(report).read_text()
    assert 'alt="precision-recall curve"' in page and f"precision in the top {TOP_N}" in page
    assert "recall in the top 1%" in page
    models = json.loads((scan_out / "scan.json").read_text())["models"]
    assert all(m["content_hash"] in page for m in models)


def test_report_without_truth_shows_scores_and_gallery_only(browser, scan_out, tmp_path):
    out = tmp_path / "scan"
    shutil.copytree(scan_out, out)
    url = write_report(str(out), top_n=5)
    page = Path(url).read_text()
    assert "No truth labels given" in page and 'alt="precision-recall curve"' not in page
    browser.open(Path(url).as_uri())
    cards = _cards_on_page(browser)
    assert len(cards) == 5 and all(c["loaded"] for c in cards)
    assert browser.errors() == []


def _gallery_data(page: str) -> dict[str, Any]:
    start = page.index('id="lensscan-data">') + len('id="lensscan-data">')
    return json.loads(page[start:page.index("</script>", start)])


def test_candidates_on_a_tile_gone_since_the_scan_are_listed_without_a_stamp(scan_out, ranked,
                                                                             tmp_path):
    out = tmp_path / "scan"
    shutil.copytree(scan_out, out)
    plan_file = out / "_plan" / "plan.json"
    plan = json.loads(plan_file.read_text())
    gone = ranked["tile"].iloc[0]
    for tile in plan["tiles"]:
        if tile["name"] == gone:
            for source in tile["sources"].values():
                source["url"] = str(tmp_path / "moved-away.fits")
    plan_file.write_text(json.dumps(plan))
    cards = _gallery_data(Path(write_report(str(out), top_n=20)).read_text())["candidates"]
    assert len(cards) == 20
    for card in cards:
        assert (card["img"] is None) == (card["tile"] == gone)
        assert (gone in card["why"]) == (card["tile"] == gone)


def test_report_command_writes_the_page_and_refuses_a_directory_without_a_scan(scan_out, tmp_path,
                                                                               capsys):
    parser = argparse.ArgumentParser()
    add_report_command(parser.add_subparsers())
    out = tmp_path / "scan"
    shutil.copytree(scan_out, out)
    args = parser.parse_args(["report", str(out), "--top", "3"])
    assert args.func(args) == 0 and (out / "report.html").exists()
    args = parser.parse_args(["report", str(tmp_path / "nothing")])
    assert args.func(args) == 2
    assert "not a finished lensscan scan" in capsys.readouterr().err
    with pytest.raises(ReportError, match="--top 0"):
        write_report(str(out), top_n=0)


def test_truth_may_be_a_csv_listing_only_the_known_lenses(ranked, tmp_path):
    known = tmp_path / "known.csv"
    known.write_text("# two known lenses\nobjid,is_lens\n" + "".join(
        f"{o},true\n" for o in ranked["objid"].iloc[[0, 3]]))
    table = pa.Table.from_pandas(ranked[["objid", "score"]], preserve_index=False)
    summary = summarise_truth(table, read_truth(str(known)), top_n=2)
    assert summary.n_lenses_scored == 2 and summary.precision_top_n == 0.5
    assert summary.n_scored_without_truth == len(ranked) - 2
    (tmp_path / "bad.csv").write_text("objid,label\n1,1\n")
    with pytest.raises(ReportError, match="is_lens"):
        read_truth(str(tmp_path / "bad.csv"))


HOSTILE = "{{data}}{{script}}<!--<script>x</script><script>alert(1)</script>"


def test_tile_names_and_catalog_strings_cannot_break_out_of_the_page(scan_out, tmp_path):
    out = tmp_path / "scan"
    shutil.copytree(scan_out, out)
    # A catalog's own tile column and reason text reach the failures table as they are.
    (out / "failures" / "plan").mkdir(parents=True, exist_ok=True)
    (out / "failures" / "plan" / "part-999999.parquet").write_bytes(table_to_bytes(failure_table(
        [1], [150.0], [2.0], [HOSTILE], [0], "plan", [HOSTILE])))
    page = Path(write_report(str(out), top_n=3)).read_text()
    assert page.count('id="lensscan-data"') == 1 and page.count("<script") == 2
    assert "alert(1)</script>" not in page and "<!--<script>" not in page
    assert "{{data}}{{script}}&lt;!--&lt;script&gt;" in page  # shown as text, filled in nowhere
    # ... and the gallery's JSON holds such strings without ending its script element.
    data = {"has_truth": False, "candidates": [{"tile": HOSTILE}]}
    page = render_html(HOSTILE, HOSTILE, data, "<p>scores</p>", "<p>provenance</p>")
    start = page.index('id="lensscan-data">') + len('id="lensscan-data">')
    block = page[start:page.index("</script>", start)]
    assert "<" not in block and json.loads(block) == data
    assert page.count("<script") == 2 and f"<title>{html.escape(HOSTILE)}</title>" in page


def test_lenses_that_failed_count_as_missed_in_recall():
    ranked = pa.table({"objid": np.arange(1, 301), "score": np.linspace(1.0, 0.0, 300)})
    truth = pd.DataFrame({"objid": [1, 3, 151, 999], "is_lens": True})
    summary = summarise_truth(ranked, truth, top_n=3, failed_objids=np.array([999, 5000]))
    assert summary.n_lenses_scored == 3 and summary.n_lenses_failed == 1
    assert summary.recall_top_fraction == pytest.approx(2 / 4)  # the best 3 hold 2 of 4 lenses
    assert summary.curve.recall[-1] == pytest.approx(3 / 4)
    assert "2 of 4 lenses" in truth_line(summary) and "1 of them failed" in truth_line(summary)


def test_colour_stamps_map_the_reddest_band_to_red_and_the_bluest_to_blue():
    assert rgb_band_order(["g", "r", "i"]) == (2, 1, 0)
    assert rgb_band_order(["i", "g", "z", "r"]) == (2, 0, 1)
    assert rgb_band_order(["b1", "b2"]) == (1, 1, 0)


def test_precision_recall_takes_tied_scores_together():
    curve = precision_recall(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 0, 1, 0]))
    np.testing.assert_allclose(curve.precision, [1.0, 2 / 3, 0.5])
    np.testing.assert_allclose(curve.recall, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(curve.thresholds, [0.9, 0.5, 0.1])
    assert curve.n_positive == 2


def test_precision_at_top_counts_lenses_among_the_best_n():
    scores = np.array([0.1, 0.9, 0.8, 0.7, 0.2])
    labels = np.array([True, True, False, True, False])
    assert precision_at_top(scores, labels, 1) == 1.0
    assert precision_at_top(scores, labels, 3) == pytest.approx(2 / 3)
    assert precision_at_top(scores, labels, 100) == pytest.approx(3 / 5)


def test_recall_in_top_fraction_looks_at_the_best_one_percent():
    scores = np.linspace(1.0, 0.0, 300)
    labels = np.zeros(300, bool)
    labels[[0, 2, 150]] = True  # top 1% of 300 objects = the best 3
    assert recall_in_top_fraction(scores, labels, 0.01) == pytest.approx(2 / 3)
    assert recall_in_top_fraction(scores, labels, 1.0) == 1.0


def test_average_precision_is_one_for_a_perfect_ranking_and_nan_without_lenses():
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0])) == 1.0
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1])) == pytest.approx(
        (0.5 + 2 / 3) / 2)
    assert math.isnan(average_precision(np.array([1.0, 0.5]), np.array([0, 0])))
    assert math.isnan(recall_in_top_fraction(np.array([1.0, 0.5]), np.array([0, 0])))


def test_metrics_refuse_unscored_objects():
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(np.array([0.5, np.nan]), np.array([1, 0]))
