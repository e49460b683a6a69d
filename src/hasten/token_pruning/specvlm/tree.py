"""Draft trees (EAGLE-2's dynamic tree): growth, the tree attention mask, positions, and acceptance.

A tree is the pending token (the root, node 0) and drafted nodes, each with a parent, a depth
and a token. The draft grows it level by level: every frontier node proposes its ``top_k``
most likely next tokens, scored by the path's summed log-probability, and the ``top_k`` best
children form the next frontier, for ``depth`` levels. The ``total`` best-scoring nodes are
then verified (scores only fall along a path, so a kept node's ancestors are kept too).

The target verifies all of them in ONE forward: node ``i`` attends the prompt and its
ancestors (itself included), at position ``prompt_length + depth(i)``. Greedy acceptance walks
down from the root, always to the child whose token equals the target's greedy choice.

Sampled acceptance (:meth:`DraftTree.accept_sampled`) treats each child as a point-mass
proposal, tried best-scored first: child ``x`` is accepted with probability ``r(x)`` under the
target's residual distribution ``r`` (initially the target's ``p`` at that node); on rejection
``r(x)`` is zeroed and ``r`` renormalised. When no child is accepted the next token is drawn
from ``r``. Every token therefore leaves each node with exactly the target's probability
(it is sequential sampling from ``p``), so the output follows the target's sampling
distribution. EAGLE's recursive rejection sampling instead divides by the draft's ``q``, which
is exact only when the children are sampled from ``q``; EAGLE-2's children are the top-k, so
the point-mass rule is the lossless one here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["DraftTree", "TreeConfig"]


@dataclass(frozen=True)
class TreeConfig:
    """EAGLE-2 / SpecVLM defaults: top-k 10, 60 drafted tokens, depth 7."""

    top_k: int = 10
    total: int = 60
    depth: int = 7

    def __post_init__(self) -> None:
        for name in ("top_k", "total", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")


@dataclass
class DraftTree:
    """Nodes in creation order; node 0 is the root (the pending token)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @classmethod
    def rooted(cls, token: int) -> "DraftTree":
        return cls([token], [-1], [0.0])

    def add(self, parent: int, token: int, score: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        return len(self.tokens) - 1

    def depth(self, node: int) -> int:
        depth = 0
        while self.parents[node] >= 0:
            node, depth = self.parents[node], depth + 1
        return depth

    def ancestors(self, node: int) -> list[int]:
        """``node`` and its ancestors up to the root."""
        path = [node]
        while self.parents[path[-1]] >= 0:
            path.append(self.parents[path[-1]])
        return path

    def select(self, total: int) -> "DraftTree":
        """The root and the ``total`` best-scoring nodes (with their ancestors), as a new tree in depth order."""
        ranked = sorted(range(1, len(self.tokens)), key=lambda n: -self.scores[n])[:total]
        keep = {0}
        for node in ranked:
            keep.update(self.ancestors(node))
        order = sorted(keep, key=lambda n: (self.depth(n), n))
        index = {old: new for new, old in enumerate(order)}
        return DraftTree([self.tokens[n] for n in order],
                         [index[self.parents[n]] if self.parents[n] >= 0 else -1 for n in order],
                         [self.scores[n] for n in order])

    def mask(self, device=None) -> torch.Tensor:
        """``(nodes, nodes)`` bool: node i may attend node j (j is i or an ancestor of i)."""
        size = len(self.tokens)
        allowed = torch.zeros(size, size, dtype=torch.bool, device=device)
        for node in range(size):
            allowed[node, self.ancestors(node)] = True
        return allowed

    def depths(self, device=None) -> torch.Tensor:
        return torch.tensor([self.depth(n) for n in range(len(self.tokens))], device=device)

    def accept(self, choices: list[int]) -> list[int]:
        """The accepted path (node indices, root first) given the target's greedy token after each node."""
        children: dict[int, dict[int, int]] = {}
        for node in range(1, len(self.tokens)):
            children.setdefault(self.parents[node], {}).setdefault(self.tokens[node], node)
        path = [0]
        while True:
            child = children.get(path[-1], {}).get(choices[path[-1]])
            if child is None:
                return path
            path.append(child)

    def accept_sampled(self, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
        """Speculative sampling on the tree: ``(accepted path, root first; the token drawn after it)``.

        ``probs`` ``(nodes, vocab)``: the target's sampling distribution after each node.
        """
        children: dict[int, list[int]] = {}
        for node in range(1, len(self.tokens)):
            children.setdefault(self.parents[node], []).append(node)
        path = [0]
        while True:
            residual = probs[path[-1]].double().cpu().clone()
            for child in sorted(children.get(path[-1], []), key=lambda n: -self.scores[n]):
                token = self.tokens[child]
                if float(torch.rand((), generator=generator, dtype=torch.float64)) < float(residual[token] / residual.sum()):
                    path.append(child)
                    break
                residual[token] = 0.0
            else:
                return path, int(torch.multinomial(residual.float(), 1, generator=generator))
