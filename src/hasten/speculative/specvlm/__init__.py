"""SpecVLM: lossless speculative decoding for VLMs with an EAGLE-style draft and an elastic visual compressor.

from hasten.speculative.specvlm import DraftModel, SpecVLM, speculative_generate, train_draft
draft = DraftModel.for_target(model)                     # or DraftModel.from_pretrained(folder, model)
train_draft(model, processor, pairs, draft, steps=2000, out="draft/")
sequences, stats = speculative_generate(model, inputs, draft, max_new_tokens=64)
stats.mean_accepted, stats.target_forwards_per_token
spec = SpecVLM(draft)                                    # the same as one object (dynamic tree by default)
sequences = spec.generate(model, inputs, max_new_tokens=64); spec.stats
"""

from .compressor import PRIMITIVES, ElasticCompressor
from .decoding import Sampling, SpecStats, SpecVLM, speculative_generate
from .draft import DraftConfig, DraftModel
from .train import load_pairs, train_draft
from .tree import DraftTree, TreeConfig

__all__ = [
    "PRIMITIVES",
    "DraftConfig",
    "DraftModel",
    "DraftTree",
    "ElasticCompressor",
    "Sampling",
    "SpecStats",
    "SpecVLM",
    "TreeConfig",
    "load_pairs",
    "speculative_generate",
    "train_draft",
]
