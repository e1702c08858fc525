"""infer/app.py in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

Two models side by side (the fp32 export and its checkpoint): upload a line image, type the reference,
submit, read both predictions and their CER off the page, compare them with eval_cer.py's prediction of
the same line, then upload a corrupt file and read the message. The screenshot is saved as
``<tmp>/app_screenshot.png`` (the path is printed). Only 127.0.0.1 is reached: chromium resolves every
other host to nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from eval import eval_cer

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium and chromium-driver (make test installs them with apt)")
        pytest.skip("apt-get install -y chromium chromium-driver (make test does it)")
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never download a driver or browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def test_app_side_by_side_predictions_equal_eval_cer_and_bad_images_get_a_message(
        browser, exported_v1, trained_v1_run, demo_data, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from infer import app

    # ---- what eval_cer.py predicts for the first training line
    ckpt = trained_v1_run / "checkpoint-60"
    eval_cer.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "eval"), "eval.split=train", "eval.max_samples=1",
                   "eval.batch_size=1"])
    expected = json.loads((tmp_path / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()[0])
    max_new = json.loads((tmp_path / "eval" / "metrics.json").read_text())["max_new_tokens"]
    row = pq.read_table(next((demo_data / "data").glob("train-*.parquet"))).to_pylist()[0]
    line = tmp_path / "line.png"
    line.write_bytes(row["image"]["bytes"])
    assert row["text"] == expected["reference"]

    port = _free_port()
    demo = app.main(["--ckpt", str(exported_v1), "--ckpt", str(ckpt), "--port", str(port), "--max-new-tokens",
                     str(max_new)], block=False)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 90)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"))

        def submit(path: Path, reference: str = "") -> None:
            browser.find_element(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(str(path))
            wait.until(lambda d: path.stem in d.find_element(By.ID, "image-input").text)  # upload finished
            box = browser.find_element(By.CSS_SELECTOR, "#reference textarea")
            box.clear()
            box.send_keys(reference)
            browser.find_element(By.ID, "submit").click()

        def value(elem_id: str) -> str:
            return browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute("value")

        submit(line, reference=row["text"])
        wait.until(lambda d: value("prediction-0") and value("prediction-1") and "CER" in d.find_element(By.ID, "details-1").text)
        assert value("prediction-0") == value("prediction-1") == expected["hypothesis"]
        details = browser.find_element(By.ID, "details-0").text
        assert f"CER {expected['cer_raw']:.4f}" in details and "confidence" in details
        shot = tmp_path / "app_screenshot.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        keep = os.environ.get("DSOCR_SCREENSHOT")  # where a developer wants to look at it
        if keep:
            shutil.copyfile(shot, keep)

        # ---- a file that is not an image: a message naming it and the reason, no stack trace
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
        browser.get(f"http://127.0.0.1:{port}/")  # a fresh page: an empty upload box
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input input[type=file]"))
        submit(bad)
        wait.until(lambda d: "broken.png" in d.find_element(By.ID, "status").text)
        status = browser.find_element(By.ID, "status").text
        assert "Cannot read broken.png: corrupt_image" in status and "not a recognised image format" in status
        assert "Traceback" not in browser.page_source and "/gradio/" not in status  # the name, not the upload path
        assert value("prediction-0") == ""
    finally:
        demo.close()


def test_transcribe_handler_never_raises(exported_v1, tmp_path):
    from dsocr.inference import load_predictor
    from infer.app import transcribe

    predictor = load_predictor(str(exported_v1), max_new_tokens=4)
    assert transcribe([predictor], None, "")[1] == "Upload an image first."
    tiny = tmp_path / "dot.png"
    from PIL import Image

    Image.new("RGB", (1, 1)).save(tiny)
    out = transcribe([predictor], str(tiny), "x")
    assert out[0] is None and "too_small" in out[1] and out[2] == ""
