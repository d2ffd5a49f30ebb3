"""End to end in a real headless Chromium: draw a digit, read the prediction, explain it, browse the test set.

Debian's /usr/bin/chromium driven by Playwright against the session's explorer server (tests/explorer_fixtures.py:
four tiny trained runs, one pooling-free and one with an arm named in HTML markup). Screenshots go to tmp_path.
"""

from __future__ import annotations

import pytest

from explorer_fixtures import ARMS, MARKUP_ARM, NO_POOL_ARM


@pytest.fixture()
def page(browser, explorer_server):
    """A fresh page that records page errors, console errors and any dialog (alert, confirm...) it is shown."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.problems = []
    page.dialogs = []
    page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
    page.on("console", lambda message: message.type == "error"
            and page.problems.append(f"console error: {message.text}"))

    def on_dialog(dialog):
        page.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    try:
        yield page
    finally:
        context.close()


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


def requests_made(page) -> int:
    return int(page.evaluate("() => Number(document.body.dataset.requests || 0)"))


def wait_until_settled(page, requests_before: int = 0) -> None:
    """Wait until more than ``requests_before`` API requests were made and none is in flight.

    The page mirrors both counts in <body data-requests data-busy>. Predicates are functions, not expressions:
    the page's CSP forbids the eval Playwright would use for an expression.
    """
    page.wait_for_function(
        "(before) => Number(document.body.dataset.requests) > before && document.body.dataset.busy === '0'",
        arg=requests_before, timeout=60_000)


def wait_for_digit(page, selector: str) -> None:
    page.wait_for_function("(selector) => /^[0-9]$/.test(document.querySelector(selector).textContent.trim())",
                           arg=selector, timeout=60_000)


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


def open_explorer(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("#confusion td.cm-cell", timeout=60_000)
    wait_until_settled(page)


def choose_run(page, label: str) -> None:
    """Pick the run whose option starts with ``label`` and wait until its curves and matrix are in."""
    value = page.evaluate(
        "(label) => [...document.querySelectorAll('#run-select option')].find(o => o.text.startsWith(label)).value",
        label)
    before = requests_made(page)
    page.select_option("#run-select", value)
    wait_until_settled(page, before)


def draw_and_wait_for_explanation(page) -> int:
    """Draw a 7, wait for every answer (prediction, saliency, activations); the predicted class."""
    before = requests_made(page)
    draw_seven(page)
    wait_for_digit(page, "#predicted-class")
    page.wait_for_selector("#activations .layer canvas", timeout=60_000)
    wait_until_settled(page, before)
    return int(page.locator("#predicted-class").inner_text())


@pytest.mark.slow
def test_draw_predict_explain_and_browse_the_test_set(page, explorer_server, tmp_path):
    open_explorer(page, explorer_server.url)
    assert page.locator("#run-select option").all_inner_texts()[0].startswith(ARMS[0])

    predicted = draw_and_wait_for_explanation(page)
    bar_widths = page.locator("#primary-result .bar-fill").evaluate_all(
        "bars => bars.map(b => parseFloat(b.style.width))")
    assert len(bar_widths) == 10 and max(bar_widths) == bar_widths[predicted]
    assert sum(bar_widths) == pytest.approx(100, abs=1)
    assert canvas_has_ink(page, "#model-input"), "the 28x28 model input should show the drawing"

    # Side by side: the second offered run answers for the same drawing.
    wait_for_digit(page, "#compare-predicted-class")
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

    # Clicking an example explains that test image above.
    before = requests_made(page)
    page.locator("#examples .example").first.click()
    wait_until_settled(page, before)
    assert page.locator("#predicted-class").inner_text() == predicted_class
    assert canvas_has_ink(page, "#pad")
    assert page.problems == [], page.problems


@pytest.mark.slow
def test_a_pooling_free_run_predicts_and_explains_in_the_page(page, explorer_server, tmp_path):
    open_explorer(page, explorer_server.url)
    choose_run(page, NO_POOL_ARM)
    assert page.locator("#primary-result .run-name").inner_text() == NO_POOL_ARM
    assert NO_POOL_ARM in page.locator("#test-summary").inner_text()

    draw_and_wait_for_explanation(page)
    titles = page.locator("#activations .layer-title").all_inner_texts()
    assert titles == ["block1_relu — 24×24×8", "block2_relu — 20×20×16", "block3_relu — 16×16×16"]
    assert page.locator("#activations .layer").nth(0).locator("canvas").count() == 8  # all 8 channels (< 16)
    assert canvas_has_ink(page, "#saliency")
    assert "block3_relu" in page.locator("#gradcam-caption").inner_text()
    assert page.locator("#status").inner_text() == "", "no request of the no_pool run may fail"

    page.screenshot(path=str(tmp_path / "no_pool_run.png"), full_page=True)
    assert page.problems == [], page.problems


@pytest.mark.slow
def test_a_run_named_in_markup_shows_as_text_and_runs_no_script(page, explorer_server, tmp_path):
    open_explorer(page, explorer_server.url)
    # The markup run is offered second, so it is the default comparison: its label is on the page at once.
    assert page.locator("#compare-result .run-name").inner_text() == MARKUP_ARM
    assert MARKUP_ARM in page.locator("#run-select option").all_inner_texts()[1]

    choose_run(page, MARKUP_ARM)
    assert page.locator("#primary-result .run-name").inner_text() == MARKUP_ARM
    assert page.locator("#metrics-table tr.group td").first.inner_text().startswith(MARKUP_ARM)
    assert page.locator("#test-summary").inner_text().startswith(f"{MARKUP_ARM}:")
    draw_and_wait_for_explanation(page)

    assert page.evaluate("() => document.querySelectorAll('img').length") == 0, "the label became an element"
    assert page.dialogs == [], page.dialogs
    page.screenshot(path=str(tmp_path / "markup_run.png"), full_page=True)
    assert page.problems == [], page.problems


@pytest.mark.slow
def test_the_api_docs_page_is_not_blocked_by_its_policy(page, explorer_server):
    csp_reports = []
    page.on("console", lambda message: "Content Security Policy" in message.text and csp_reports.append(message.text))
    page.goto(explorer_server.url + "/api/docs")
    page.wait_for_load_state("load")
    # Swagger UI itself comes from a CDN this machine may not reach; what matters is that the policy blocks nothing.
    assert csp_reports == [], csp_reports
