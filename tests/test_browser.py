"""End to end in a real headless Chromium: draw a digit, read the prediction, browse the confusion matrix.

Debian's /usr/bin/chromium driven by Playwright against ``python -m mnist_ablation.serve --study`` on a
free 127.0.0.1 port, over the same tiny trained study as tests/test_serve.py. Screenshots go to tmp_path
and to /work/notes/screenshots/ (when that directory can be made) for people to look at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

try:  # tests/ as a package or as a plain directory on sys.path
    from tests.test_serve import ARMS, start_study_server, trained_study_store
except ImportError:
    from test_serve import ARMS, start_study_server, trained_study_store

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGUMENTS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTES_SCREENSHOTS = Path("/work/notes/screenshots")


@pytest.fixture(scope="module")
def server(tmp_path_factory, mnist, data_dir):
    store = trained_study_store(tmp_path_factory, mnist)
    process = start_study_server(tmp_path_factory, data_dir, store)
    yield process
    process.stop()


@pytest.fixture()
def page(server):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found; install Debian's chromium package (apt-get install chromium).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGUMENTS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.problems = []
            page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
            page.on("console", lambda message: message.type == "error"
                    and page.problems.append(f"console error: {message.text}"))
            yield page
        finally:
            browser.close()


def draw_seven(page) -> None:
    """A '7' drawn with the mouse on the pad: a top bar, then a long diagonal down to the left."""
    box = page.locator("#pad").bounding_box()
    left, top = box["x"], box["y"]
    page.mouse.move(left + 70, top + 60)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(left + 70 + 14 * step, top + 60)
    for step in range(1, 13):
        page.mouse.move(left + 210 - 8 * step, top + 60 + 15 * step)
    page.mouse.up()


def wait_until_settled(page, requests_before: int = 0) -> None:
    """Wait until more than ``requests_before`` API requests were made and none is in flight.

    The page mirrors both counts in <body data-requests data-busy>.
    """
    page.wait_for_function(
        f"Number(document.body.dataset.requests) > {requests_before} && document.body.dataset.busy === '0'",
        timeout=30_000)


def canvas_has_ink(page, selector: str) -> bool:
    return page.evaluate(
        """(selector) => {
            const canvas = document.querySelector(selector);
            const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            for (let i = 0; i < pixels.length; i += 4) if (pixels[i] + pixels[i + 1] + pixels[i + 2] > 60) return true;
            return false;
        }""",
        selector,
    )


@pytest.mark.slow
def test_draw_predict_explain_and_browse_the_test_set(page, server, tmp_path):
    page.goto(server.url + "/")
    page.wait_for_selector("#confusion td.cm-cell", timeout=60_000)
    assert page.locator("#run-select option").all_inner_texts()[0].startswith(ARMS[0])

    draw_seven(page)
    page.wait_for_function("/^[0-9]$/.test(document.querySelector('#predicted-class').textContent.trim())",
                           timeout=30_000)
    # Predictions update while the stroke is drawn; read the final one once every request has answered.
    page.wait_for_selector("#activations .layer canvas", timeout=30_000)
    wait_until_settled(page)
    predicted = int(page.locator("#predicted-class").inner_text())
    bar_widths = page.locator("#primary-result .bar-fill").evaluate_all("bars => bars.map(b => parseFloat(b.style.width))")
    assert len(bar_widths) == 10 and max(bar_widths) == bar_widths[predicted] and sum(bar_widths) == pytest.approx(100, abs=1)
    assert canvas_has_ink(page, "#model-input"), "the 28x28 model input should show the drawing"

    # Side by side: the second arm answers for the same drawing.
    page.wait_for_function("/^[0-9]$/.test(document.querySelector('#compare-predicted-class').textContent.trim())",
                           timeout=30_000)
    assert page.locator("#compare-result .run-name").inner_text() == ARMS[1]

    # Why: saliency and Grad-CAM painted, activation maps of the three conv layers.
    assert page.locator("#activations .layer").count() == 3
    assert canvas_has_ink(page, "#saliency")

    # Test-set browser: the biggest cell of the matrix, its images, most confident first.
    counts = page.locator("#confusion td.cm-cell").evaluate_all("cells => cells.map(c => Number(c.textContent))")
    biggest = max(range(100), key=lambda k: counts[k])
    cell = page.locator("#confusion td.cm-cell").nth(biggest)
    label, predicted_class = cell.get_attribute("data-label"), cell.get_attribute("data-predicted")
    cell.click()
    page.wait_for_selector("#examples .example", timeout=60_000)
    assert page.locator("#examples .example").count() == min(24, counts[biggest])
    assert page.locator("#examples-title").inner_text().startswith(f"True {label} → predicted {predicted_class}: "
                                                                   f"{counts[biggest]}")
    confidences = [float(text.split("=")[1]) for text in
                   page.locator("#examples .example .caption.muted").all_inner_texts()]
    assert confidences == sorted(confidences, reverse=True)

    # Training section: metrics and both curves.
    assert "test accuracy" in page.locator("#metrics-table").inner_text()
    assert page.locator("#loss-chart svg circle").count() >= 2
    assert "/#/experiments/" in page.locator("#mlflow-link").get_attribute("href")

    screenshot = tmp_path / "model_explorer.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 20_000
    try:
        NOTES_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, NOTES_SCREENSHOTS / "model_explorer.png")
    except OSError:
        pass  # only a convenience for people reading the notes

    # Clicking an example explains that test image above.
    first = page.locator("#examples .example").first
    requests_before = int(page.evaluate("document.body.dataset.requests"))
    first.click()
    wait_until_settled(page, requests_before)
    assert page.locator("#predicted-class").inner_text() == predicted_class
    assert canvas_has_ink(page, "#pad")
    assert page.problems == [], page.problems
