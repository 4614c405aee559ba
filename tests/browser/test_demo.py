"""The demo in a real browser: headless Chromium (Debian's) driven by Playwright."""

import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
FACES = Path(__file__).resolve().parents[2] / "moa" / "assets" / "celeba_test_single"


@pytest.fixture
def page(chromium, demo_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": 1400, "height": 2200})
        tab.goto(demo_url)
        tab.wait_for_selector("#generate", timeout=60_000)
        yield tab
        browser.close()


def _screenshot(page, tmp_path, name):
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("MOA_DEMO_SCREENSHOTS")  # a folder to keep them in, to look at them
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path


def _fill(page, prompt: str, word: str):
    face = sorted(FACES.glob("*/*.jpg"))[0]
    page.locator("#subject-1-image input[type=file]").set_input_files(str(face))
    page.locator("#generate-prompt textarea").fill(prompt)
    page.locator("#subject-1-word textarea").fill(word)


def test_upload_a_subject_generate_and_see_both_images_and_the_router_overlay(page, tmp_path):
    start = time.monotonic()
    _fill(page, "a man holding a red cup in a park", "man")
    page.locator("#generate").click()
    for element in ("#prior-image img", "#moa-image img", "#router-overlay img"):
        page.wait_for_selector(element, timeout=120_000)
    sizes = [page.locator(e).evaluate("img => [img.naturalWidth, img.naturalHeight]")
             for e in ("#prior-image img", "#moa-image img", "#router-overlay img")]
    assert all(w > 0 and h > 0 for w, h in sizes), sizes
    assert sizes[2][0] > sizes[1][0], "the overlay figure holds several tiles"
    assert "Cannot" not in page.locator("#generate-message").inner_text()
    print(f"browser generate round trip {time.monotonic() - start:.1f}s; screenshot {_screenshot(page, tmp_path, 'generate')}")


def test_a_word_missing_from_the_prompt_is_a_message_in_the_page(page, tmp_path):
    _fill(page, "a woman holding a red cup in a park", "man")
    page.locator("#generate").click()
    message = page.locator("#generate-message")
    message.filter(has_text="Cannot generate").wait_for(timeout=60_000)
    text = message.inner_text()
    assert "'man'" in text and "Traceback" not in page.content()
    _screenshot(page, tmp_path, "error")
