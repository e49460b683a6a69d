"""VLM token-pruning demo: image + question + method + budget -> answer, kept tokens, stats.

Run it with ``hasten app vlm [--model trained-llava] [--port 7860]`` or ``python -m hasten.apps.vlm_app``.
The model is loaded once, when the app is built. The default is the micro-world LLaVA trained on
:mod:`hasten.tiny.vqa` (weights shipped), opened on a generated held-out scene and its question,
so the answer can be checked (it is marked right or wrong); the random-weight ``tiny-*`` models
and hub ids work too. Every Run answers the question with the chosen pruning method (``none`` for
the unpruned model). It shows the answer and the image with the dropped visual tokens darkened
on the model's token grid, and the same at the budgets of :data:`SWEEP`, each with its answer.
LLaVA's grid covers the center crop its processor feeds the vision tower; Qwen's covers the
whole image. It also shows the pruning stats: visual tokens kept, prefill length, KV-cache bytes
and time.

Examples
--------
>>> import numpy as np
>>> from hasten.token_pruning.evaluate import load_vlm
>>> run = VLMRun(*load_vlm("tiny-llava", "cpu"), "tiny-llava")
>>> answer, overlay, stats, sweep = run(np.zeros((32, 32, 3), np.uint8), "What?", "hired", 0.25)
>>> "16/64" in stats, [caption.split(":")[0] for _, caption in sweep]
(True, ['100%', '50%', '25%', '20%', '10%'])
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from hasten.apps.launcher import add_common_args, connect_run, launch, random_weights_notice
from hasten.cli.vlm import DEFAULT_MODEL, default_question, supported_methods
from hasten.measure import timed
from hasten.tiny.vlms import chat_prompt
from hasten.token_pruning.evaluate import TRAINED, load_vlm, make_method

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
    shown = np.asarray(
        Image.fromarray(image).convert("RGB").resize((width, height), Image.NEAREST if small else Image.BICUBIC),
        dtype=np.float32,
    )
    if grid is None or len(kept) != rows * cols:
        return shown.astype(np.uint8)
    cells = kept.view(rows, cols).numpy().astype(np.float32)
    shade = np.asarray(Image.fromarray((cells * 255).astype(np.uint8)).resize((width, height), Image.NEAREST))
    factor = 0.25 + 0.75 * (shade[..., None] / 255.0)  # dropped tokens at 25% brightness
    return (shown * factor).clip(0, 255).astype(np.uint8)


SPECULATIVE = "speculative (SpecVLM)"
SPECULATIVE_TOKENS = 64  # a micro-world description is ~34 tokens
DEFAULT_BUDGET = 0.2
SWEEP = (1.0, 0.5, 0.2, 0.1)  # budgets whose kept tokens are drawn side by side on every Run
EXAMPLE_SEEDS = (0, 3)  # held-out scenes the trained LLaVA answers right, at every SWEEP budget with hired
# (7 of held-out seeds 0-11 are; unpruned it answers 56% of colour questions right: docs/token_pruning.md)


class VLMRun:
    """The app's Run button on the loaded model."""

    def __init__(self, model, processor, name: str, draft=None):
        self.model, self.processor, self.name, self.draft = model, processor, name, draft

    def _speculative(self, image: np.ndarray, inputs) -> tuple[str, np.ndarray, str]:
        """Lossless speculative decoding with the loaded draft, timed against plain generate()."""
        from hasten.speculative.specvlm import speculative_generate

        if self.draft is None:
            raise gr.Error("no SpecVLM draft is loaded: start the app with --draft DIR (hasten vlm train-draft)")

        def plain_decoding():
            with torch.no_grad():
                return self.model.generate(**inputs, max_new_tokens=SPECULATIVE_TOKENS, do_sample=False)

        def speculative_decoding():
            return speculative_generate(self.model, inputs, self.draft, max_new_tokens=SPECULATIVE_TOKENS)

        plain_decoding(), speculative_decoding()  # untimed first calls: neither side pays one-off costs
        plain, plain_seconds = timed(plain_decoding, self.model.device)
        (output, stats), seconds = timed(speculative_decoding, self.model.device)
        same = "identical to" if torch.equal(output, plain) else "DIFFERENT from"
        answer = self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        report = (
            f"**speculative**: {stats.mean_accepted:.2f} tokens per target pass (accepted length), "
            f"{stats.target_forwards} target passes for {stats.new_tokens} tokens, {seconds:.2f} s vs "
            f"{plain_seconds:.2f} s plain: **{plain_seconds / max(seconds, 1e-9):.2f}x**; output {same} "
            f"greedy generate(). The draft saw {stats.compressed_visual[1]}/{stats.compressed_visual[0]} "
            "visual tokens; the target saw them all."
        )
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
        side = int(round(count**0.5))
        return (side, side) if side * side == count else None

    def _answer(self, inputs, method) -> tuple[str, float]:
        """Greedy answer (at most 24 tokens) with ``method`` attached (None: unpruned), and its seconds."""

        def decode():
            pruning = method.apply(self.model) if method is not None else contextlib.nullcontext()
            with torch.no_grad(), pruning:
                return self.model.generate(**inputs, max_new_tokens=24, do_sample=False)

        output, seconds = timed(decode, self.model.device)
        answer = self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return answer.strip() or "(empty answer)", seconds

    def __call__(
        self, image: np.ndarray | None, question: str, method_name: str, budget: float | None, truth: str | None = None
    ):
        """Answer at ``budget`` (answer, overlay, stats) and the kept tokens at :data:`SWEEP` budgets (gallery).

        ``truth``: the right answer when known (the generated scenes); each answer is then marked right or wrong.
        """
        if image is None:
            raise gr.Error("Upload an image first.")
        if method_name not in ("none", SPECULATIVE) and (budget is None or not 0 < float(budget) <= 1):
            raise gr.Error(f"`budget` must be a fraction of the visual tokens in (0, 1], got {budget!r}")
        truth = (truth or "").strip()
        try:
            inputs = self.processor(
                images=[Image.fromarray(image).convert("RGB")],
                text=[chat_prompt(self.processor, question or "What is in the picture?")],
                return_tensors="pt",
            ).to(self.model.device)
            if method_name == SPECULATIVE:
                return (*self._speculative(image, inputs), [])
            method = None if method_name == "none" else make_method(method_name, float(budget))
            answer, seconds = self._answer(inputs, method)
            sweep = [] if method is None else [(b, make_method(method_name, b)) for b in SWEEP if b != float(budget)]
            swept = [(b, m, *self._answer(inputs, m)) for b, m in sweep]
        except ValueError as error:
            raise gr.Error(str(error)) from error
        count = int((inputs["input_ids"][0] == self.model.config.image_token_id).sum())
        if method is None:
            kept = torch.ones(count, dtype=torch.bool)
            stats = f"unpruned: {count} visual tokens, prompt {inputs['input_ids'].shape[1]} tokens, {seconds:.2f} s"
        else:
            s = method.stats
            kept = s.visual_kept_mask[0]
            stats = (
                f"**{method_name}, budget {float(budget):g}**: visual tokens "
                f"{s.visual_tokens_kept[0]}/{s.visual_tokens_in[0]}, prefill {s.prefill_tokens}/{s.prompt_tokens} "
                f"tokens, KV cache {s.kv_cache_bytes / 1024:.1f} KiB, "
                f"{seconds:.2f} s ({self.name} on {self.model.device})"
            )
        if truth:
            stats += f"\n\nAnswer **{_verdict(answer, truth)}** (right answer: {truth})."
        grid = self._grid(inputs, count)
        if grid is None:
            stats += "\n\n(the visual tokens of this model are not one grid: no overlay)"
        elif len(kept) > grid[0] * grid[1]:
            stats += "\n\n(overlay: the full-image partition; the sub-images' tokens follow it)"
        runs = (
            sorted([(float(budget), method, answer), *((b, m, a) for b, m, a, _ in swept)], key=lambda run: -run[0])
            if method is not None
            else []
        )
        gallery = [
            (
                self._overlay(image, m.stats.visual_kept_mask[0], grid),
                f"{b:.0%}: {a}" + (f" ({_verdict(a, truth)})" if truth else ""),
            )
            for b, m, a in runs
        ]
        return answer, self._overlay(image, kept, grid), stats, gallery

    @staticmethod
    def _overlay(image: np.ndarray, kept: torch.Tensor, grid: tuple[int, int] | None) -> np.ndarray:
        if grid is not None and len(kept) > grid[0] * grid[1]:
            kept = kept[: grid[0] * grid[1]]
        return draw_kept(image, kept, grid)


def _verdict(answer: str, truth: str) -> str:
    return "right" if answer.strip().lower() == truth.strip().lower() else "wrong"


def build_demo(
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    draft: str | None = None,
) -> gr.Blocks:
    """The VLM pruning app for ``model`` (``trained-llava``, ``tiny-qwen2-vl``, ... or a hub id), loaded once.

    It opens on :func:`hasten.cli.vlm.default_question`'s image and question (a held-out scene for
    the trained models; its ground-truth answer is shown next to the model's).

    ``dtype`` is accepted for the shared launcher flags (bfloat16 on CUDA, float32 on CPU). With
    ``draft`` (a folder from ``hasten vlm train-draft``; ``trained-llava``: its shipped draft by default)
    the method list gains speculative decoding.
    """
    (first_image, *more), first_question, truth = default_question(model)
    if more:
        raise ValueError(
            f"the VLM app shows one image; {model} answers about {1 + len(more)} screenshots: "
            f"use `hasten vlm ask --model {model}`"
        )
    loaded, processor = load_vlm(model, device)
    draft_model = None
    if draft is not None:
        from hasten.speculative.specvlm import DraftModel

        draft_model = DraftModel.from_pretrained(draft, loaded)
    elif model == "trained-llava":  # its shipped draft (hasten tiny train llava-draft)
        from hasten.tiny.micro_vlm import load_draft

        draft_model = load_draft(loaded)
    run = VLMRun(loaded, processor, model, draft_model)
    methods = ["none", *supported_methods(loaded)] + ([SPECULATIVE] if draft_model is not None else [])
    default = "hired" if "hired" in methods else "fastv"  # a paper method, not a baseline
    folder = Path(tempfile.mkdtemp(prefix="hasten-vlm-app-"))
    examples = []
    for seed in EXAMPLE_SEEDS if model in TRAINED else (0,):
        (scene, *_), question_text, answer_text = default_question(model, seed)
        path = folder / f"scene-{seed}.png"
        scene.save(path)
        examples.append([str(path), question_text, default, DEFAULT_BUDGET, answer_text or ""])
    if model == "trained-llava":  # a long answer, where speculative decoding has something to accept
        (scene, *_), question_text, answer_text = default_question(model, 0, "describe")
        path = folder / "scene-0-describe.png"
        scene.save(path)
        examples.append([str(path), question_text, SPECULATIVE, DEFAULT_BUDGET, answer_text])
    with gr.Blocks(title="hasten · VLM token pruning") as demo:
        gr.Markdown(
            f"# VLM visual-token pruning\n`{model}` ({type(loaded).__name__}) on `{loaded.device}`. "
            "The method keeps a budget of the visual tokens before (or inside) the language model; "
            "dropped tokens are darkened on the model's token grid. Every Run also draws the kept tokens "
            f"at budgets {', '.join(f'{b:.0%}' for b in SWEEP)} with the answer at each."
        )
        notice = random_weights_notice(model)
        if notice:
            gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="numpy", value=np.asarray(first_image), elem_id="image")
                question = gr.Textbox(label="Question", value=first_question, elem_id="question")
                right = gr.Textbox(
                    label="Right answer (when known: generated scenes; each answer is marked)",
                    value=truth or "",
                    elem_id="truth",
                )
                method = gr.Dropdown(methods, value=default, label="Method", elem_id="method")
                budget = gr.Slider(
                    0.05,
                    1.0,
                    value=DEFAULT_BUDGET,
                    step=0.05,
                    label="Budget (fraction of visual tokens kept)",
                    elem_id="budget",
                )
                button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                with gr.Row():
                    with gr.Column(scale=1):
                        answer = gr.Textbox(label="Answer", elem_id="answer", interactive=False)
                        stats = gr.Markdown("Press **Run**, or an example below.", elem_id="stats")
                    overlay = gr.Image(
                        label="Kept visual tokens at this budget",
                        type="numpy",
                        format="png",
                        interactive=False,
                        height=300,
                        elem_id="overlay",
                    )
                sweep = gr.Gallery(
                    label="Kept tokens and answer at several budgets",
                    columns=len(SWEEP),
                    height=260,
                    object_fit="contain",
                    format="png",
                    elem_id="sweep",
                )
        connect_run(
            button,
            run,
            [image, question, method, budget, right],
            [answer, overlay, stats, sweep],
            examples,
            f"Examples: held-out scenes, {default} at {DEFAULT_BUDGET:.0%} of the tokens"
            + (", and a description decoded speculatively" if model == "trained-llava" else "")
            + " (one click)",
        )
    return demo


def main(argv: list[str] | None = None) -> int:
    """``hasten app vlm``: parse the common app flags, build the demo and serve it until stopped."""
    parser = argparse.ArgumentParser(prog="hasten app vlm", description="Gradio app: VLM visual-token pruning.")
    add_common_args(parser, default_model=DEFAULT_MODEL)
    parser.add_argument(
        "--draft",
        default=None,
        help="a SpecVLM draft folder (hasten vlm train-draft): adds speculative decoding to the methods "
        "(trained-llava: its shipped draft by default)",
    )
    args = parser.parse_args(argv)
    demo = build_demo(args.model, device=args.device, dtype=args.dtype, draft=args.draft)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
