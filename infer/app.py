r"""A local web demo: upload an image, read the transcription; with two models, side by side.

    python infer/app.py --ckpt runs/v1_lora_zh/final                                   # http://127.0.0.1:7860
    python infer/app.py --ckpt deepseek-ai/DeepSeek-OCR --ckpt exports/v1-zh --port 7861   # base vs fine-tuned

Each ``--ckpt`` is loaded like ``infer/predict.py`` loads it (same prompt, image mode and generation), so a
line reads the same here as there. The optional reference box scores each prediction (CER raw and
normalised, ``dsocr.metrics``, with the model's eval normalisation). The upload is decoded by the training
data's decoder (``data.images.open_image``, the model's limits): a file that is not an image, or one over
the limits, gets a message naming the reason, never a stack trace. The server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("app")
HOST = "127.0.0.1"  # loopback only: the demo has no authentication
DEFAULT_PORT = 7860


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``--ckpt`` (once or twice), ``--port`` and the prediction overrides of ``infer/predict.py``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="model to serve (give two to compare)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT})")
    p.add_argument("--prompt", help="line, document, or the instruction text (default: as trained)")
    p.add_argument("--image-mode", help="preprocessing mode (default: as trained)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer (default: as infer/predict.py)")
    p.add_argument("--config", help="run config YAML for a base model")
    args = p.parse_args(argv)
    if len(args.ckpt) > 2:
        p.error(f"--ckpt given {len(args.ckpt)} times; the demo shows one model or two side by side")
    return args


def score_reference(predictor, reference: str, hypothesis: str) -> str:
    """``CER x (norm y)`` of one line against the reference, with the model's eval normalisation."""
    from dsocr.metrics import NormalizeConfig, score_lines

    ev = predictor.cfg.eval
    corpus, _ = score_lines([reference], [hypothesis], normalize_cfg=NormalizeConfig(
        nfkc=ev.nfkc, remove_whitespace=ev.remove_whitespace, lowercase=ev.lowercase))
    exact = "exact match" if corpus["line_acc_norm"] == 1.0 else f"{corpus['edits_norm']} edits"
    return f"CER {corpus['cer_raw']:.4f} (normalised {corpus['cer_norm']:.4f}, {exact})"


def transcribe(predictors, path: str | None, reference: str | None) -> tuple:
    """The click handler: ``(preview image, status, text 1, details 1[, text 2, details 2])``.

    Never raises: a missing upload, an unreadable image or a failing model becomes the status message.
    """
    from data.images import BadRecordError, open_image

    empty = [None, ""] + ["", ""] * len(predictors)
    if not path:
        return tuple([None, "Upload an image first."] + empty[2:])
    name = os.path.basename(path)
    try:
        # The first model's limits: both models of one comparison normally come from one run.
        image = open_image(path, record_id=name, limits=predictors[0].limits)
    except BadRecordError as e:
        # The upload sits in a temporary folder of gradio's: name the file as the user knows it.
        detail = e.detail.replace(repr(path), repr(name)).replace(path, name)
        return tuple([None, f"Cannot read {name}: {e.reason}: {detail}"] + empty[2:])
    outputs: list = [image, f"{name}: {image.size[0]} x {image.size[1]} px"]
    for predictor in predictors:
        try:
            pred = predictor.predict([(name, image)])[0]
        except Exception as e:  # noqa: BLE001 - shown to the user instead of a stack trace; logged in full
            log.exception("prediction failed for %s with %s", name, predictor.name)
            outputs += ["", f"Prediction failed: {type(e).__name__}: {e}"]
            continue
        conf = pred["confidence"]
        details = (f"confidence {conf['mean']:.3f} (lowest token {conf['min']:.3f}), {pred['new_tokens']} tokens"
                   if conf["mean"] is not None else f"{pred['new_tokens']} tokens")
        if reference and reference.strip():
            details += "; " + score_reference(predictor, reference.strip(), pred["text"])
        outputs += [pred["text"], details]
    return tuple(outputs)


def build_app(predictors):
    """The Gradio Blocks app for one or two loaded ``dsocr.inference.Predictor`` objects.

    Element ids (for the browser test and for styling): ``image-input``, ``reference``, ``submit``,
    ``status``, ``preview``, and per model ``prediction-<i>`` and ``details-<i>``.
    """
    import gradio as gr

    with gr.Blocks(title="DeepSeek-OCR fine-tune demo") as demo:
        gr.Markdown("## DeepSeek-OCR: upload an image, read the text")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="image-input")
                reference = gr.Textbox(label="Reference text (optional: scores each prediction)", lines=1,
                                       elem_id="reference")
                submit = gr.Button("Transcribe", variant="primary", elem_id="submit")
                status = gr.Markdown(elem_id="status")
                preview = gr.Image(label="Decoded image", type="pil", interactive=False, height=160, elem_id="preview")
            outputs = [preview, status]
            for i, predictor in enumerate(predictors):
                with gr.Column(scale=1):
                    gr.Markdown(f"**{predictor.name}**: {predictor.loaded.family.name}, image mode "
                                f"`{predictor.image_mode}`, prompt `{predictor.prompt!r}`")
                    text = gr.Textbox(label=f"Prediction: {predictor.name}", lines=3, interactive=False,
                                      elem_id=f"prediction-{i}")
                    details = gr.Markdown(elem_id=f"details-{i}")
                    outputs += [text, details]
        submit.click(lambda path, ref: transcribe(predictors, path, ref), inputs=[upload, reference], outputs=outputs)
    return demo


def launch(demo, port: int, block: bool = True):
    """Serve ``demo`` on 127.0.0.1:``port``; with ``block=False`` return at once (tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    import gradio as gr

    # System fonts: the default theme would make the browser fetch web fonts from outside.
    theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])
    return demo.launch(server_name=HOST, server_port=port, prevent_thread_lock=not block, share=False,
                       ssr_mode=False, show_error=False, quiet=not block, theme=theme)


def main(argv: list[str] | None = None, block: bool = True):
    """Load the models and serve the demo; returns the Gradio app when ``block`` is False."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from dsocr.checkpoints import CheckpointError
    from dsocr.config import ConfigError
    from dsocr.inference import load_predictor

    try:
        predictors = [load_predictor(c, config=args.config, prompt=args.prompt, image_mode=args.image_mode,
                                     max_new_tokens=args.max_new_tokens, batch_size=1) for c in args.ckpt]
    except (CheckpointError, ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if len(predictors) == 2 and predictors[0].name == predictors[1].name:
        predictors[1].name += " (2)"
    demo = build_app(predictors)
    print(f"serving on http://{HOST}:{args.port}")
    launch(demo, args.port, block=block)
    return demo


if __name__ == "__main__":
    main()
