"""VLM token-pruning demo: image + question + method + budget -> answer, kept tokens, stats.

Run it with ``hasten app vlm [--model trained-llava] [--port 7860]`` or ``python apps/vlm_app.py``.
The model is loaded once, when the app is built. The default is the micro-world LLaVA trained on
:mod:`hasten.tiny.vqa` (weights shipped), opened on a generated held-out scene and its question,
so the answer can be checked by eye; the random-weight ``tiny-*`` models and hub ids work too. Every Run answers the question with the chosen
pruning method (``none`` for the unpruned model). It shows the answer and the image with the
dropped visual tokens darkened on the model's token grid. LLaVA's grid covers the center crop
its processor feeds the vision tower; Qwen's covers the whole image. It also shows the pruning
stats: visual tokens kept, prefill length, KV-cache bytes and time.

Examples
--------
>>> import numpy as np
>>> from hasten.token_pruning.evaluate import load_vlm
>>> run = VLMRun(*load_vlm("tiny-llava", "cpu"), "tiny-llava")
>>> answer, overlay, stats = run(np.zeros((32, 32, 3), np.uint8), "What?", "hired", 0.25)
>>> "16/64" in stats
True
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script or loaded by file path (`hasten app vlm`)
    _ROOT = str(Path(__file__).resolve().parents[1])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from apps.launcher import add_common_args, launch  # noqa: E402
from hasten.cli.vlm import DEFAULT_MODEL, default_question, supported_methods  # noqa: E402
from hasten.tiny.vlms import chat_prompt  # noqa: E402
from hasten.token_pruning.evaluate import load_vlm, make_method  # noqa: E402

__all__ = ["VLMRun", "build_demo", "draw_kept", "main"]

DISPLAY_SIDE = 384


def draw_kept(image: np.ndarray, kept: torch.Tensor, grid: tuple[int, int] | None) -> np.ndarray:
    """``image`` resized for display with the dropped cells of the ``rows x cols`` token grid darkened.

    Examples
    --------
    >>> out = draw_kept(np.full((8, 8, 3), 200, np.uint8), torch.tensor([True, False, False, True]), (2, 2))
    >>> out.shape, int(out[0, 0, 0]) > int(out[0, -1, 0])
    ((384, 384, 3), True)
    """
    rows, cols = grid if grid is not None else (1, 1)
    height = DISPLAY_SIDE
    width = max(1, round(DISPLAY_SIDE * image.shape[1] / image.shape[0]))
    small = image.shape[0] < height  # a tiny scene: show its pixels, not a blur
    shown = np.asarray(Image.fromarray(image).convert("RGB").resize(
        (width, height), Image.NEAREST if small else Image.BICUBIC), dtype=np.float32)
    if grid is None or len(kept) != rows * cols:
        return shown.astype(np.uint8)
    cells = kept.view(rows, cols).numpy().astype(np.float32)
    shade = np.asarray(Image.fromarray((cells * 255).astype(np.uint8)).resize((width, height), Image.NEAREST))
    factor = 0.25 + 0.75 * (shade[..., None] / 255.0)  # dropped tokens at 25% brightness
    return (shown * factor).clip(0, 255).astype(np.uint8)


SPECULATIVE = "speculative (SpecVLM)"


class VLMRun:
    """The app's Run button on the loaded model."""

    def __init__(self, model, processor, name: str, draft=None):
        self.model, self.processor, self.name, self.draft = model, processor, name, draft

    def _speculative(self, image: np.ndarray, inputs) -> tuple[str, np.ndarray, str]:
        """Lossless speculative decoding with the loaded draft, timed against plain generate()."""
        from hasten.speculative.specvlm import speculative_generate

        if self.draft is None:
            raise gr.Error("no SpecVLM draft is loaded: start the app with --draft DIR (hasten vlm train-draft)")
        start = time.perf_counter()
        with torch.no_grad():
            plain = self.model.generate(**inputs, max_new_tokens=24, do_sample=False)
        plain_seconds = time.perf_counter() - start
        output, stats = speculative_generate(self.model, inputs, self.draft, max_new_tokens=24)
        same = "identical to" if torch.equal(output, plain) else "DIFFERENT from"
        answer = self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        report = (f"**speculative**: {stats.mean_accepted:.2f} tokens per target pass (accepted length), "
                  f"{stats.target_forwards} target passes for {stats.new_tokens} tokens, {stats.seconds:.2f} s vs "
                  f"{plain_seconds:.2f} s plain: **{plain_seconds / max(stats.seconds, 1e-9):.2f}x**; output {same} "
                  f"greedy generate(). The draft saw {stats.compressed_visual[1]}/{stats.compressed_visual[0]} "
                  "visual tokens; the target saw them all.")
        return answer.strip() or "(empty answer)", draw_kept(image, torch.ones(0, dtype=torch.bool), None), report

    def _grid(self, inputs, count: int) -> tuple[int, int] | None:
        if "image_grid_thw" in inputs:  # Qwen: merged patch grid
            _, h, w = inputs["image_grid_thw"][0].tolist()
            merge = self.model.config.vision_config.spatial_merge_size
            return h // merge, w // merge
        if "image_sizes" in inputs:  # LLaVA-Next: the full-image partition's grid comes first
            vision = self.model.config.vision_config
            side = vision.image_size // vision.patch_size
            return side, side
        side = int(round(count ** 0.5))
        return (side, side) if side * side == count else None

    def __call__(self, image: np.ndarray | None, question: str, method_name: str, budget: float | None):
        if image is None:
            raise gr.Error("Upload an image first.")
        try:
            inputs = self.processor(images=[Image.fromarray(image).convert("RGB")],
                                    text=[chat_prompt(self.processor, question or "What is in the picture?")],
                                    return_tensors="pt").to(self.model.device)
            if method_name == SPECULATIVE:
                return self._speculative(image, inputs)
            method = None if method_name == "none" else make_method(method_name, float(budget or 0))
            start = time.perf_counter()
            with torch.no_grad():
                if method is None:
                    output = self.model.generate(**inputs, max_new_tokens=24, do_sample=False)
                else:
                    with method.apply(self.model):
                        output = self.model.generate(**inputs, max_new_tokens=24, do_sample=False)
            seconds = time.perf_counter() - start
        except ValueError as error:
            raise gr.Error(str(error)) from error
        answer = self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        count = int((inputs["input_ids"][0] == self.model.config.image_token_id).sum())
        if method is None:
            kept = torch.ones(count, dtype=torch.bool)
            stats = f"unpruned: {count} visual tokens, prompt {inputs['input_ids'].shape[1]} tokens, {seconds:.2f} s"
        else:
            s = method.stats
            kept = s.visual_kept_mask[0]
            stats = (f"**{method_name}, budget {budget}**: visual tokens {s.visual_tokens_kept[0]}/{s.visual_tokens_in[0]}, "
                     f"prefill {s.prefill_tokens}/{s.prompt_tokens} tokens, KV cache {s.kv_cache_bytes / 1024:.1f} KiB, "
                     f"{seconds:.2f} s ({self.name} on {self.model.device})")
        grid = self._grid(inputs, count)
        if grid is None:
            stats += "\n\n(the visual tokens of this model are not one grid: no overlay)"
        elif len(kept) > grid[0] * grid[1]:
            kept = kept[: grid[0] * grid[1]]
            stats += "\n\n(overlay: the full-image partition; the sub-images' tokens follow it)"
        return answer.strip() or "(empty answer)", draw_kept(image, kept, grid), stats


def build_demo(model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None,
               draft: str | None = None) -> gr.Blocks:
    """The VLM pruning app for ``model`` (``trained-llava``, ``tiny-qwen2-vl``, ... or a hub id), loaded once.

    It opens on :func:`hasten.cli.vlm.default_question`'s image and question (a held-out scene for
    the trained models; its ground-truth answer is shown next to the model's).

    ``dtype`` is accepted for the shared launcher flags (bfloat16 on CUDA, float32 on CPU). With
    ``draft`` (a folder from ``hasten vlm train-draft``) the method list gains speculative decoding.
    """
    loaded, processor = load_vlm(model, device)
    draft_model = None
    if draft is not None:
        from hasten.speculative.specvlm import DraftModel

        draft_model = DraftModel.from_pretrained(draft, loaded)
    run = VLMRun(loaded, processor, model, draft_model)
    first_image, first_question, truth = default_question(model)
    methods = ["none", *supported_methods(loaded)] + ([SPECULATIVE] if draft_model is not None else [])
    with gr.Blocks(title="hasten · VLM token pruning") as demo:
        gr.Markdown(f"# VLM visual-token pruning\n`{model}` ({type(loaded).__name__}) on `{loaded.device}`. "
                    "Dropped visual tokens are darkened on the model's token grid.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="numpy", value=np.asarray(first_image), elem_id="image")
                question = gr.Textbox(label="Question", value=first_question, elem_id="question")
                if truth is not None:
                    gr.Markdown(f"Generated held-out scene: the right answer to this question is **{truth}**.",
                                elem_id="truth")
                default = "hired" if "hired" in methods else "fastv"  # a paper method, not a baseline
                method = gr.Dropdown(methods, value=default, label="Method", elem_id="method")
                budget = gr.Slider(0.05, 1.0, value=0.2, step=0.05, label="Budget (fraction of visual tokens kept)",
                                   elem_id="budget")
                button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                answer = gr.Textbox(label="Answer", elem_id="answer", interactive=False)
                overlay = gr.Image(label="Kept visual tokens", type="numpy", format="png", interactive=False,
                                   elem_id="overlay")
                stats = gr.Markdown("Press **Run**.", elem_id="stats")
        button.click(run, [image, question, method, budget], [answer, overlay, stats], api_name="run",
                     concurrency_limit=1)
    return demo


def main(argv: list[str] | None = None) -> int:
    """``hasten app vlm``: parse the common app flags, build the demo and serve it until stopped."""
    parser = argparse.ArgumentParser(prog="hasten app vlm", description="Gradio app: VLM visual-token pruning.")
    add_common_args(parser, default_model=DEFAULT_MODEL)
    parser.add_argument("--draft", default=None, help="a SpecVLM draft folder (hasten vlm train-draft): adds "
                        "speculative decoding to the methods")
    args = parser.parse_args(argv)
    demo = build_demo(args.model, device=args.device, dtype=args.dtype, draft=args.draft)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
