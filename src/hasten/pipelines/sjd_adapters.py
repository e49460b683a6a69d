"""Where the image tokens are, per autoregressive text-to-image model family (for :mod:`.sjd`).

An adapter answers, for one transformers model class: how a prompt (and its unconditional
twin for CFG) becomes input embeddings, the layout of the image-token span (rows, columns and
the positions of deterministic layout tokens such as Emu3's end-of-line), how a token becomes
an input embedding, which logits are the image-token distribution, and how image tokens decode
to pixels. The decoding loop in :mod:`.sjd` knows none of this.

Token ids in the loop are *sequence ids*: what the adapter embeds. For Janus they are codebook
indices (Janus feeds image tokens through its own generation embeddings); for Emu3 they are
text-vocabulary ids (its visual tokens live in the text vocabulary). ``vocab_ids`` maps the
image-vocabulary index ``i`` (the column of the image logits) to its sequence id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ADAPTERS", "ARImageAdapter", "Emu3Adapter", "ImageLayout", "JanusAdapter", "adapter_for"]


@dataclass(frozen=True)
class ImageLayout:
    """The image-token span: ``rows x cols`` sampled tokens in raster order, plus fixed tokens.

    ``fixed`` maps a span position to the sequence id placed there without sampling (Emu3's
    end-of-line token after every row); ``row_stride`` is the span distance between vertically
    adjacent image tokens (``cols`` plus the fixed tokens of one row).
    """

    rows: int
    cols: int
    length: int
    row_stride: int
    fixed: dict[int, int] = field(default_factory=dict)

    def grid_position(self, position: int) -> tuple[int, int]:
        """(row, column) of the image token at span ``position`` (not a fixed one)."""
        return position // self.row_stride, position % self.row_stride

    def neighbour(self, position: int, direction: str) -> int | None:
        """Span position of the left (``"horizontal"``) or upper (``"vertical"``) neighbour, if any."""
        row, col = self.grid_position(position)
        if direction == "horizontal":
            return position - 1 if col > 0 else None
        return position - self.row_stride if row > 0 else None

    def image_positions(self) -> list[int]:
        """Span positions of the sampled image tokens, in raster order."""
        return [p for p in range(self.length) if p not in self.fixed]


class ARImageAdapter:
    """Base class: one autoregressive image model family. Subclasses fill in the hooks."""

    #: transformers class name this adapter serves
    model_class: str = ""
    #: defaults from the family's official generation code
    default_guidance_scale: float = 1.0
    default_top_k: int | None = None

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def language_model(self) -> torch.nn.Module:
        raise NotImplementedError

    vocab_ids: torch.Tensor  # (V,) sequence id of each image-vocabulary index

    def encode_prompt(
        self, prompt: str, negative_prompt: str | None, cfg: bool, layout: ImageLayout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings ``(R, S, H)`` and attention mask ``(R, S)``; R = 2 (cond, uncond) with CFG."""
        raise NotImplementedError

    def layout(self, height: int | None, width: int | None) -> ImageLayout:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(R, n, H)`` of sequence ids ``(R, n)``."""
        raise NotImplementedError

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Image-vocabulary logits ``(R, n, V)`` from the language model's last hidden states."""
        raise NotImplementedError

    def decode(self, ids: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [0, 1] from the span's sequence ids ``(B, layout.length)``."""
        raise NotImplementedError


class JanusAdapter(ARImageAdapter):
    """``JanusForConditionalGeneration`` in image mode (Janus, Janus-Pro).

    The prompt ends with the begin-of-image token; the unconditional row replaces every prompt
    token except BOS and BOI by the pad token (as Janus's own generate() and official code do).
    Image tokens are codebook indices fed through ``generation_embeddings`` +
    ``generation_aligner``; the image logits come from ``generation_head``. Official sampling
    defaults: CFG weight 5, temperature 1, no top-k.
    """

    model_class = "JanusForConditionalGeneration"
    default_guidance_scale = 5.0

    def __init__(self, model, processor):
        super().__init__(model, processor)
        vq = model.config.vq_config
        self.vocab_ids = torch.arange(vq.num_embeddings, device=model.device)
        self.grid = vq.num_patches

    @property
    def language_model(self):
        return self.model.model.language_model

    def encode_prompt(self, prompt, negative_prompt, cfg, layout):
        if negative_prompt is not None:
            raise ValueError("Janus's unconditional branch is the masked prompt: `negative_prompt` is not supported")
        inputs = self.processor(text=[prompt], generation_mode="image", return_tensors="pt")
        ids = inputs["input_ids"].to(self.device)
        if cfg:
            tokenizer = self.processor.tokenizer
            uncond = ids.clone()
            keep = (uncond == tokenizer.bos_token_id) | (uncond == tokenizer.convert_tokens_to_ids(tokenizer.boi_token))
            uncond[~keep] = tokenizer.pad_token_id
            ids = torch.cat([ids, uncond])
        return self.model.get_input_embeddings()(ids), torch.ones_like(ids)

    def layout(self, height, width):
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != self.grid:
                raise ValueError(
                    f"this Janus model generates {self.grid} x {self.grid} image tokens; got {name}={value}"
                )
        return ImageLayout(rows=self.grid, cols=self.grid, length=self.grid * self.grid, row_stride=self.grid)

    def embed(self, ids):
        return self.model.prepare_embeddings_for_image_generation(ids)

    def image_logits(self, hidden):
        return self.model.model.generation_head(hidden)

    def decode(self, ids, layout):
        pixels = self.model.decode_image_tokens(ids)  # (B, H, W, 3) in [-1, 1]
        return ((pixels.permute(0, 3, 1, 2).float() + 1) / 2).clamp(0, 1)


class Emu3Adapter(ARImageAdapter):
    """``Emu3ForConditionalGeneration`` (Emu3-Gen).

    The prompt ends with ``<|image start|>{rows}*{cols}<|image token|>`` (``Emu3Processor`` with
    ``return_for_image_generation=True``); the unconditional row is the negative prompt (default
    empty) with the same image prefix, both left-padded to one length. Every row of ``cols``
    visual tokens is followed by the end-of-line token, placed without sampling. The image logits
    are the LM-head columns of the visual tokens (what Emu3's prefix-constrained generation
    samples from). Official sampling defaults: CFG 3.0, top-k 2048.
    """

    model_class = "Emu3ForConditionalGeneration"
    default_guidance_scale = 3.0
    default_top_k = 2048

    def __init__(self, model, processor):
        super().__init__(model, processor)
        mapping = model.model.vocabulary_mapping
        self.vocab_ids = torch.tensor(mapping.image_tokens, device=model.device)
        self.eol_id = mapping.eol_token_id
        self.spatial_factor = processor.downsample_ratio

    @property
    def language_model(self):
        return self.model.model.text_model

    def _token_size(self, height, width) -> tuple[int, int]:
        if height is None or width is None:
            area = self.processor.image_processor.max_pixels
            side = int(round(area**0.5 / self.spatial_factor))
            return side, side
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % self.spatial_factor:
                raise ValueError(f"`{name}` must be a positive multiple of {self.spatial_factor} pixels, got {value}")
        return height // self.spatial_factor, width // self.spatial_factor

    def encode_prompt(self, prompt, negative_prompt, cfg, layout):
        image_prompt = (
            f"{self.processor.image_start_token}{layout.rows}*{layout.cols}{self.processor.fake_token_around_image}"
        )
        texts = [prompt] + ([negative_prompt or ""] if cfg else [])
        inputs = self.processor.tokenizer(
            [f"{self.processor.bos_token}{t}{image_prompt}" for t in texts], padding=True, return_tensors="pt"
        )
        ids = inputs["input_ids"].to(self.device)
        return self.model.get_input_embeddings()(ids), inputs["attention_mask"].to(self.device)

    def layout(self, height, width):
        rows, cols = self._token_size(height, width)
        fixed = {row * (cols + 1) + cols: self.eol_id for row in range(rows)}
        return ImageLayout(rows=rows, cols=cols, length=rows * (cols + 1), row_stride=cols + 1, fixed=fixed)

    def embed(self, ids):
        return self.model.get_input_embeddings()(ids)

    def image_logits(self, hidden):
        return self.model.lm_head(hidden)[..., self.vocab_ids]

    def decode(self, ids, layout):
        # Emu3's decoder expects the span plus 3 closing tokens (EOF, EOI, EOS) and drops them.
        closing = ids.new_zeros(ids.shape[0], 3)
        pixels = self.model.model.decode_image_tokens(torch.cat([ids, closing], 1), layout.rows, layout.cols)
        return ((pixels.float() + 1) / 2).clamp(0, 1)


ADAPTERS: dict[str, type[ARImageAdapter]] = {cls.model_class: cls for cls in (JanusAdapter, Emu3Adapter)}


def adapter_for(model: Any, processor: Any) -> ARImageAdapter:
    """The adapter for ``model``'s class; ``ValueError`` naming the supported classes otherwise."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"unsupported model class {name}; SJD supports {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](model, processor)
