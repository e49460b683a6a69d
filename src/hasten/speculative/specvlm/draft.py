"""The SpecVLM / EAGLE draft: one decoder layer over the target's features, sharing its embeddings and head.

At position ``t`` the draft reads the target's last hidden state ``f_t`` (the feature the LM
head turns into logits) and the embedding of the next token ``x_{t+1}``, fused by a linear
layer, and predicts ``f_{t+1}``; the TARGET's LM head turns that into draft logits. The
embeddings and the head are the target's own modules, bound at run time and never copied or
saved: :meth:`DraftModel.save_pretrained` writes the draft's weights (fusion layer, decoder
layer, compressor) and a config that names the target's geometry, which
:meth:`DraftModel.from_pretrained` checks against the target it is bound to.

The decoder layer is a Llama layer with the target's text-model geometry and plain 1-D RoPE
over the draft's own sequence (the draft's positions are its own, so Qwen's mRoPE is not
needed there).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...transformers_conventions import cache_keyword
from .compressor import ElasticCompressor

__all__ = ["DraftConfig", "DraftModel"]

CONFIG_NAME = "draft_config.json"
WEIGHTS_NAME = "draft.safetensors"


@dataclass
class DraftConfig:
    """The draft's geometry (taken from the target's text model) and the target it was built for."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    target_class: str = ""
    compressor: str = "pool"

    @classmethod
    def for_target(cls, model: Any, compressor: str = "pool") -> "DraftConfig":
        text = getattr(model.config, "text_config", model.config)
        theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", getattr(text, "rope_theta", 10000.0))
        return cls(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            vocab_size=text.vocab_size,
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            rope_theta=float(theta or 10000.0),
            target_class=type(model).__name__,
            compressor=compressor,
        )

    def llama(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            num_hidden_layers=1,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )


class DraftModel(nn.Module):
    """EAGLE-style draft (see the module docstring); build with :meth:`for_target` or :meth:`from_pretrained`.

    Examples
    --------
    >>> import hasten.tiny
    >>> target, _ = hasten.tiny.vlm("llava")
    >>> draft = DraftModel.for_target(target)
    >>> sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in target.parameters())
    True
    """

    def __init__(self, config: DraftConfig):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.config = config
        llama = config.llama()
        llama._attn_implementation = "sdpa"
        self.fuse = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=True)
        self.layer = LlamaDecoderLayer(llama, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(llama)
        self.compressor = ElasticCompressor(config.hidden_size, config.compressor)
        self._target: dict[str, Any] = {}

    @classmethod
    def for_target(cls, model: Any, compressor: str = "pool", seed: int = 0) -> "DraftModel":
        """A fresh draft for ``model``, its layer initialised from the target's last decoder layer."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draft = cls(DraftConfig.for_target(model, compressor))
        draft.bind(model)
        last = _language_model(model).layers[-1]
        own, theirs = draft.layer.state_dict(), last.state_dict()
        if all(k in theirs and theirs[k].shape == v.shape for k, v in own.items()):
            draft.layer.load_state_dict({k: theirs[k] for k in own})  # a warm start, as EAGLE's authors advise
        with torch.no_grad():  # start as "the current feature" plus a little of the next token's embedding
            hidden = draft.config.hidden_size
            draft.fuse.weight[:, hidden:] *= 0.1
            draft.fuse.weight[:, :hidden] = torch.eye(hidden)
            draft.fuse.bias.zero_()
        return draft.to(**_placement(model))

    def bind(self, model: Any) -> "DraftModel":
        """Use ``model``'s embeddings and LM head (checked against the draft's config)."""
        config = DraftConfig.for_target(model, self.config.compressor)
        for name in ("hidden_size", "vocab_size"):
            if getattr(config, name) != getattr(self.config, name):
                raise ValueError(
                    f"this draft was trained for a target with {name} = {getattr(self.config, name)}; "
                    f"{type(model).__name__} has {getattr(config, name)}"
                )
        self._target = {"embed": model.get_input_embeddings(), "head": model.get_output_embeddings()}
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self._target["head"](features)

    def forward(
        self,
        features: torch.Tensor,
        next_tokens: torch.Tensor,
        cache=None,
        start: int = 0,
        next_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted next features ``(B, T, H)`` from features ``(B, T, H)`` and the next tokens ``(B, T)``.

        By default the ``T`` inputs sit at positions ``start ..`` and attend causally (all cached
        entries visible); a draft tree passes its own ``positions`` ``(T,)`` and ``allowed``
        ``(T, cached + T)`` mask, a padded batch a per-row ``allowed`` ``(B, T, cached + T)``.
        """
        if not self._target:
            raise ValueError("bind() the draft to its target model first")
        embeds = next_embeds if next_embeds is not None else self._target["embed"](next_tokens)
        x = self.fuse(torch.cat([features.to(self.fuse.weight.dtype), embeds.to(self.fuse.weight.dtype)], -1))
        if positions is None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        positions = positions.to(x.device)[None].expand(x.shape[0], -1)
        cos_sin = self.rotary(x, positions)
        mask = None
        if allowed is None and x.shape[1] > 1:  # causal over the new tokens, everything cached before them visible
            allowed = torch.arange(start + x.shape[1], device=x.device)[None] <= positions[0][:, None]
        if allowed is not None:  # (T, K) for every row, or (B, T, K) per row (padded batches)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~allowed.to(x.device), torch.finfo(x.dtype).min
            )
            mask = mask[None, None] if mask.dim() == 2 else mask[:, None]
        if not hasattr(self, "_cache_arg"):
            self._cache_arg = cache_keyword(self.layer)  # read once: inspect.signature costs host time per call
        out = self.layer(
            x,
            attention_mask=mask,
            position_ids=positions,
            **{self._cache_arg: cache},
            position_embeddings=cos_sin,
            use_cache=cache is not None,
        )
        return out[0] if isinstance(out, tuple) else out

    # --- persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_NAME))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, target: Any) -> "DraftModel":
        """Load a draft and bind it to ``target``; clear errors for a missing, corrupt or mismatched one."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = DraftConfig(**json.loads((folder / CONFIG_NAME).read_text()))
            weights = load_file(str(folder / WEIGHTS_NAME))
        except FileNotFoundError as error:
            raise ValueError(f"{folder} holds no SpecVLM draft ({CONFIG_NAME} + {WEIGHTS_NAME})") from error
        except Exception as error:  # noqa: BLE001 - json / safetensors errors of a corrupt checkpoint
            raise ValueError(f"the draft checkpoint in {folder} is corrupt: {type(error).__name__}: {error}") from error
        draft = cls(config).bind(target)
        missing, unexpected = draft.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the draft checkpoint in {folder} does not match its config (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        return draft.to(**_placement(target))


def _placement(model: Any) -> dict:
    """The target's device and dtype: the draft lives beside it."""
    parameter = next(model.parameters())
    return dict(device=parameter.device, dtype=parameter.dtype)


def _language_model(model: Any):
    from ...token_pruning.adapters import adapter_for

    return adapter_for(model).language_model(model)
