"""infer/predict.py: folders, globs, PDFs and bad files; its predictions equal eval_cer.py's on the same lines."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.images import ImageLimits
from dsocr.inputs import expand_inputs, load_items
from eval import eval_cer
from infer import predict


def _split_rows(demo_data: Path, split: str) -> list[dict]:
    return pq.read_table(next((demo_data / "data").glob(f"{split}-*.parquet"))).to_pylist()


def _write_lines(demo_data: Path, split: str, n: int, folder: Path) -> list[tuple[Path, str]]:
    """The split's first ``n`` images as PNG files (the parquet's own bytes), with their labels."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, row in enumerate(_split_rows(demo_data, split)[:n]):
        path = folder / f"{split}_{i:02d}.png"
        path.write_bytes(row["image"]["bytes"])
        out.append((path, row["text"]))
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, demo_data) -> Path:
    """Three good line images, one corrupt PNG, a two-page PDF and a note that is not an input."""
    folder = tmp_path_factory.mktemp("mixed")
    _write_lines(demo_data, "test", 3, folder)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    pages = [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in _split_rows(demo_data, "test")[3:5]]
    pages[0].save(folder / "two_pages.pdf", save_all=True, append_images=pages[1:])
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_folder_names_the_corrupt_file_keeps_every_page_and_exits_nonzero(exported_v1, mixed_folder, tmp_path,
                                                                               capsys):
    out = tmp_path / "pred.jsonl"
    code = predict.main(["--ckpt", str(exported_v1), str(mixed_folder), "--out", str(out), "--max-new-tokens", "12",
                         "--quiet"])
    assert code == 1
    rows = _rows(out)
    by_name = {(Path(r["path"]).name, r["page"]): r for r in rows}
    assert sorted(by_name) == [("corrupt.png", None), ("test_00.png", None), ("test_01.png", None),
                               ("test_02.png", None), ("two_pages.pdf", 1), ("two_pages.pdf", 2)]
    bad = by_name[("corrupt.png", None)]
    assert bad["error"] == "corrupt_image" and "corrupt.png" in bad["message"] and "text" not in bad
    for key, row in by_name.items():
        if key[0] != "corrupt.png":
            assert isinstance(row["text"], str) and row["new_tokens"] > 0 and row["seconds"] >= 0
            assert 0 < row["confidence"]["min"] <= row["confidence"]["mean"] <= 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "corrupt.png: corrupt_image:" in lines[0] and "re-export" in lines[0]
    assert "5 images/pages" in err and "1 failed" in err


def test_predict_agrees_with_eval_cer_on_the_same_lines(trained_v1_run, demo_data, tmp_path):
    ckpt = trained_v1_run / "checkpoint-60"
    eval_cer.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "eval"), "eval.split=train", "eval.max_samples=8",
                   "eval.batch_size=8"])
    evaluated = _rows(tmp_path / "eval" / "predictions.jsonl")
    max_new = json.loads((tmp_path / "eval" / "metrics.json").read_text())["max_new_tokens"]
    files = _write_lines(demo_data, "train", 8, tmp_path / "lines")
    out = tmp_path / "pred.jsonl"
    # another batch size than eval's: batched generation is batch-size independent
    code = predict.main(["--ckpt", str(ckpt), str(tmp_path / "lines"), "--out", str(out), "--batch-size", "3",
                         "--max-new-tokens", str(max_new), "--quiet"])
    assert code == 0
    predicted = _rows(out)
    assert [Path(r["path"]).name for r in predicted] == [p.name for p, _ in files]
    assert [r["text"] for r in predicted] == [p["hypothesis"] for p in evaluated]
    assert [p["reference"] for p in evaluated] == [t for _, t in files]
    for r, p in zip(predicted, evaluated):
        assert abs(r["confidence"]["mean"] - p["confidence_mean"]) < 1e-4
        assert abs(r["confidence"]["min"] - p["confidence_min"]) < 1e-4


def test_txt_dir_writes_one_text_file_per_input(exported_v1, mixed_folder, tmp_path):
    code = predict.main(["--ckpt", str(exported_v1), str(mixed_folder / "two_pages.pdf"), str(mixed_folder / "test_0*.png"),
                         "--txt-dir", str(tmp_path / "txt"), "--max-new-tokens", "8", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "txt").iterdir()) == ["test_00.txt", "test_01.txt", "test_02.txt",
                                                                     "two_pages.txt"]
    assert (tmp_path / "txt" / "two_pages.txt").read_text().count("\f") == 1  # two pages, one page break


def test_prompt_and_image_mode_default_to_training_and_can_be_overridden(exported_v1):
    from dsocr.inference import PROMPTS, load_predictor

    trained = load_predictor(str(exported_v1))
    assert trained.prompt == "<image>\nFree OCR." and trained.image_mode == "tiny" and trained.kind == "exported"
    doc = load_predictor(str(exported_v1), prompt="document", image_mode="gundam")
    assert doc.prompt == PROMPTS["document"] and doc.image_mode == "gundam" and doc.settings.max_new_tokens == 8192
    with pytest.raises(ValueError, match="--image-mode 'gundum' is not one of"):
        load_predictor(str(exported_v1), image_mode="gundum")
    with pytest.raises(ValueError, match="must contain '<image>' exactly once"):
        load_predictor(str(exported_v1), prompt="Free OCR.")


def test_inputs_expand_folders_globs_and_name_what_matches_nothing(mixed_folder, tmp_path):
    files, errors = expand_inputs([str(mixed_folder / "*.pdf"), str(mixed_folder), str(tmp_path / "missing.png"),
                                   str(tmp_path / "*.jpg")])
    names = [p.name for p in files]
    assert names == ["two_pages.pdf", "corrupt.png", "test_00.png", "test_01.png", "test_02.png"]  # once each, no notes.txt
    assert [e.reason for e in errors] == ["not_found", "not_found"]
    assert "missing.png" in errors[0].line() and "matches no file" in errors[1].message


def test_pdf_page_over_the_pixel_limit_is_refused_before_rendering(mixed_folder):
    items = list(load_items([mixed_folder / "two_pages.pdf"], limits=ImageLimits(max_pixels=1000), pdf_dpi=200))
    assert [(i.page, e.reason) for i, _, e in items] == [(1, "pdf_page_too_large"), (2, "pdf_page_too_large")]
    assert "--pdf-dpi" in items[0][2].message


def test_corrupt_pdf_is_one_error(tmp_path):
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4\nthis is not a pdf body")
    items = list(load_items([bad]))
    assert len(items) == 1 and items[0][1] is None and items[0][2].reason == "corrupt_pdf"
    assert "broken.pdf" in items[0][2].line()
