"""The web demo (`lmeye app --checkpoint DIR`): upload an image or pick a demo one, ask, read the
answer as it streams; with no image the question is answered text-only.

A file that is not an image shows an error under the upload box and the app keeps serving (the
upload goes through a plain file box and is opened here, so the message is ours, naming the file).
Components carry ``elem_id``s (``upload``, ``demo-image``, ``preview``, ``status``, ``question``,
``ask``, ``answer``) for the browser test and for anyone scripting the page.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

from lmeye.errors import UserError
from lmeye.serve.images import open_image

NO_DEMO = "(none)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
MAX_DEMO_IMAGES = 24


def demo_images(directory: Optional[str]) -> dict[str, str]:
    """Name -> path of up to MAX_DEMO_IMAGES images in ``directory`` (sorted by name)."""
    if not directory:
        return {}
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: demo image folder not found")
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_SUFFIXES))
    return {n: os.path.join(directory, n) for n in names[:MAX_DEMO_IMAGES]}


def _error(err: Exception) -> str:
    return f"**Error:** {err}"


class DemoHandlers:
    """The app's event handlers, free of Gradio so they can be tested directly."""

    def __init__(self, assistant, demos: dict[str, str]):
        self.assistant = assistant
        self.demos = demos

    def _select(self, path: Optional[str], shown: str):
        """(image path state, preview, status) for a newly chosen image."""
        if not path:
            return None, None, "No image: questions are answered text-only."
        try:
            preview = open_image(path).convert("RGB")
            self.assistant.features(path)  # decoded and encoded exactly as a question will
        except UserError as err:
            return None, None, _error(str(err).replace(path, shown))
        return path, preview, f"Image: {shown}"

    def on_upload(self, path: Optional[str]):
        return self._select(path, os.path.basename(path) if path else "")

    def on_pick(self, name: Optional[str]):
        if not name or name == NO_DEMO:
            return self._select(None, "")
        if name not in self.demos:
            return None, None, _error(f"{name}: not a demo image")
        return self._select(self.demos[name], name)

    def on_ask(self, path: Optional[str], question: str, max_new_tokens: int = 64, sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, num_beams: int = 1) -> Iterator[tuple[str, str]]:
        """Streams (answer so far, status)."""
        try:
            pieces = self.assistant.ask(
                path, question, stream=True, max_new_tokens=int(max_new_tokens), do_sample=bool(sample),
                temperature=float(temperature), top_p=float(top_p), num_beams=int(num_beams),
            )
            text = ""
            for piece in pieces:
                text += piece
                yield text, ""
            yield text.strip(), ""
        except UserError as err:
            yield "", _error(err)


def build_app(assistant, demos: Optional[dict[str, str]] = None):
    """The Gradio Blocks of the demo (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # else it calls out to api.gradio.app
    import gradio as gr

    demos = dict(demos or {})
    h = DemoHandlers(assistant, demos)
    with gr.Blocks(title="LMEye demo") as app:
        gr.Markdown("## LMEye: ask about an image\nUpload an image or pick a demo one, then ask. "
                    "Without an image the question is answered text-only.")
        image_path = gr.State(None)
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Upload an image", file_types=["image"], type="filepath", elem_id="upload")
                pick = gr.Dropdown([NO_DEMO, *demos], value=NO_DEMO, label="or pick a demo image",
                                   elem_id="demo-image", visible=bool(demos))
                preview = gr.Image(label="Image", type="pil", interactive=False, elem_id="preview")
                status = gr.Markdown("No image: questions are answered text-only.", elem_id="status")
            with gr.Column():
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                answer = gr.Textbox(label="Answer", lines=4, interactive=False, elem_id="answer")
                with gr.Accordion("Decoding", open=False):
                    max_new = gr.Slider(1, 512, value=64, step=1, label="max new tokens")
                    sample = gr.Checkbox(False, label="sample (else greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, label="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, label="top p")
                    beams = gr.Slider(1, 8, value=1, step=1, label="beams (no streaming above 1)")
        chosen = [image_path, preview, status]
        upload.upload(h.on_upload, upload, chosen)
        upload.clear(lambda: h.on_upload(None), None, chosen)
        pick.change(h.on_pick, pick, chosen)
        inputs = [image_path, question, max_new, sample, temperature, top_p, beams]
        ask.click(h.on_ask, inputs, [answer, status])
        question.submit(h.on_ask, inputs, [answer, status])
    return app


def serve(assistant, *, host: str = "127.0.0.1", port: int = 7860, demos: Optional[dict[str, str]] = None,
          block: bool = True):
    """Launch on ``host:port`` (loopback by default; nothing is shared publicly). Returns the Blocks."""
    app = build_app(assistant, demos)
    app.queue().launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                       quiet=not block, show_error=True)
    return app


def demo_dir_default() -> Optional[str]:
    """The demo corpus's images when the demo has run in this folder (``make demo``)."""
    path = Path("demo_out") / "corpus" / "images"
    return str(path) if path.is_dir() else None
