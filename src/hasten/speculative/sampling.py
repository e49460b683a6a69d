"""Sampling settings, one implementation for every speculative decoder (SJD and SpecVLM).

:class:`Sampling` turns logits into the distribution a token is drawn from, the way
transformers' ``generate()`` does (its ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
``TopPLogitsWarper``, in that order, then a softmax), and draws from it (argmax when
``greedy``). Speculative acceptance (:mod:`.acceptance`) compares these processed
distributions, so drafter and verifier must use the same settings: both take them from here.

Examples
--------
>>> import torch
>>> sampling = Sampling(temperature=0.5, top_k=2)
>>> probs = sampling.probs(torch.tensor([[2.0, 1.0, 0.0]]))
>>> [round(p, 3) for p in probs[0].tolist()]
[0.881, 0.119, 0.0]
>>> Sampling(greedy=True).draw(probs).tolist()
[0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .._validation import check_number, check_positive_int

__all__ = ["Sampling", "draw"]


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: temperature, then top-k, then top-p (``generate()``'s order), or argmax.

    Parameters
    ----------
    temperature : float, default 1.0
        Logits are divided by it (> 0).
    top_k : int, optional
        Keep the ``top_k`` most likely tokens (ties at the k-th score kept, as transformers does).
    top_p : float, optional
        Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (in (0, 1]).
    greedy : bool, default False
        Draw the argmax (speculative acceptance is then exact-match).
    seed : int, default 0
        Seeds the generator of a decoder that owns one (:func:`~hasten.speculative.speculative_generate`).

    Examples
    --------
    >>> Sampling(top_p=0.9).processors()[0].__class__.__name__
    'TopPLogitsWarper'
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_number(self.temperature, "temperature", 0, open_low=True)
        if self.top_k is not None:
            check_positive_int(self.top_k, "top_k")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.greedy, bool):
            raise ValueError(f"`greedy` must be True or False, got {self.greedy!r}")

    def processors(self) -> LogitsProcessorList:
        """The transformers warpers these settings stand for (no-op ones left out)."""
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k is not None:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``(..., vocab)`` logits -> the processed sampling distribution (float32, or float64 for
        float64 logits), on the logits' device."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        scores = logits.to(dtype)
        shape = scores.shape
        scores = self.processors()(None, scores.reshape(-1, shape[-1]))
        return torch.softmax(scores, dim=-1).reshape(shape)

    def draw(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per distribution in ``probs`` ``(..., vocab)``: argmax when greedy, else a draw."""
        return draw(probs, generator, self.greedy)

    def generator(self, device: torch.device | str) -> torch.Generator:
        """A generator on ``device`` seeded with :attr:`seed`."""
        return torch.Generator(device=device).manual_seed(self.seed)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
    """One index per distribution in ``probs`` ``(..., vocab)``, shape ``(...)``, on ``probs``' device.

    ``greedy`` takes the argmax; otherwise ``torch.multinomial`` with ``generator`` (which must live
    on the same device). No host sync either way.
    """
    if greedy:
        return probs.argmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
