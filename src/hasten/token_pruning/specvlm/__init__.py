"""SpecVLM: lossless speculative decoding for VLMs with an EAGLE-style draft and an elastic visual compressor.

    from hasten.token_pruning.specvlm import DraftModel, speculative_generate, train_draft
    draft = DraftModel.for_target(model)                     # or DraftModel.from_pretrained(folder, model)
    train_draft(model, processor, pairs, draft, steps=2000, out="draft/")
    sequences, stats = speculative_generate(model, inputs, draft, max_new_tokens=64)
    stats.mean_accepted, stats.target_forwards_per_token
"""

from .compressor import PRIMITIVES, ElasticCompressor
from .decoding import Sampling, SpecStats, speculative_generate
from .draft import DraftConfig, DraftModel
from .train import load_pairs, train_draft
from .tree import DraftTree, TreeConfig

__all__ = ["PRIMITIVES", "DraftConfig", "DraftModel", "DraftTree", "ElasticCompressor", "Sampling", "SpecStats",
           "TreeConfig", "load_pairs", "speculative_generate", "train_draft"]
