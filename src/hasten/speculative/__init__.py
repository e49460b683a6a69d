"""Speculative decoding: one acceptance core and one set of sampling settings for SJD and SpecVLM.

- :mod:`.sampling` — :class:`Sampling` (temperature, top-k, top-p, greedy -> processed
  probabilities and draws), shared by every decoder.
- :mod:`.acceptance` — the lossless rules, batched and on the device: :func:`chain_verify`
  (speculative sampling over draft chains: SJD, SpecVLM chains) and :func:`tree_accept`
  (the point-mass rule over draft trees: SpecVLM / EAGLE-2 trees).
- :mod:`.specvlm` — SpecVLM: an EAGLE-style draft over a VLM's features with an elastic visual
  compressor, online distillation, chain or dynamic-tree drafting.
- :mod:`.profiling` — :class:`HostProfile`: host milliseconds and device syncs of a loop.
- SJD (speculative Jacobi decoding for text-to-image AR models) is a pipeline:
  :class:`hasten.pipelines.SJDPipeline`; it decodes with this package's core.

Examples
--------
>>> import torch
>>> from hasten.speculative import Sampling, chain_verify
>>> sampling = Sampling(temperature=0.7, top_k=3)
>>> q = sampling.probs(torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(0)))
>>> drafts = sampling.draw(q[:, :4], torch.Generator().manual_seed(1))
>>> verdict = chain_verify(drafts, q[:, :4], q, generator=torch.Generator().manual_seed(2))
>>> verdict.lengths.tolist()                   # drafts drawn from q itself always pass
[4, 4]
"""

from .acceptance import ChainVerdict, chain_verify, residual, tree_accept
from .profiling import HostProfile
from .sampling import Sampling, draw
from .specvlm import (
    PRIMITIVES,
    DraftConfig,
    DraftModel,
    DraftTree,
    ElasticCompressor,
    SpecStats,
    SpecVLM,
    TreeConfig,
    load_pairs,
    speculative_generate,
    train_draft,
)

__all__ = [
    "PRIMITIVES",
    "ChainVerdict",
    "DraftConfig",
    "DraftModel",
    "DraftTree",
    "ElasticCompressor",
    "HostProfile",
    "Sampling",
    "SpecStats",
    "SpecVLM",
    "TreeConfig",
    "chain_verify",
    "draw",
    "load_pairs",
    "residual",
    "speculative_generate",
    "train_draft",
    "tree_accept",
]
