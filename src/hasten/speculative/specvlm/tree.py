"""Draft trees (EAGLE-2's dynamic tree) as device tensors: growth, mask, positions, selection, acceptance.

A tree is the pending token (the root, node 0) and drafted nodes, each with a parent, a token and
a score (the path's summed draft log-probability), held as tensors on the model's device so that
growing, selecting and verifying a tree costs no host round trip: ``paths[i, d]`` is node ``i``'s
ancestor at depth ``d`` (``-1`` past its own depth), from which the tree attention mask and the
positions follow by indexing. Nodes are created parents first (a parent's index is below its
children's).

The draft grows the tree level by level: every frontier node proposes its ``top_k`` most likely
next tokens, scored by the path's summed log-probability, and the ``top_k`` best children form
the next frontier, for ``depth`` levels. The ``total`` best-scoring nodes are then verified
(scores only fall along a path and ties are broken parents first, so a kept node's ancestors are
kept too).

The target verifies all of them in ONE forward: node ``i`` attends the prompt and its ancestors
(itself included), at position ``prompt_length + depth(i)``. Acceptance is the point-mass rule of
:func:`hasten.speculative.tree_accept`: at each node the target's token (argmax, or one draw from
its processed distribution) is followed into the child that carries it; the first node without
such a child ends the path and that token comes next. With sampling this is exactly sequential
point-mass speculative sampling over the (distinct) children, so the output follows the target's
distribution. EAGLE's recursive rejection sampling instead divides by the draft's ``q``, which is
exact only when the children are sampled from ``q``; EAGLE-2's children are the top-k, so the
point-mass rule is the lossless one here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._validation import check_positive_int
from ..acceptance import tree_accept
from ..sampling import draw

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
            check_positive_int(value, name)


@dataclass
class DraftTree:
    """Nodes in creation order (parents first); node 0 is the root (the pending token).

    Examples
    --------
    >>> tree = DraftTree.rooted(7)
    >>> a = tree.add(0, 1, -0.1); b = tree.add(0, 2, -0.5); c = tree.add(a, 3, -0.2)
    >>> tree.depths().tolist(), tree.accept([1, 3, 0, 9])
    ([0, 1, 1, 2], [0, 1, 3])
    """

    tokens: torch.Tensor  # (N,) long
    parents: torch.Tensor  # (N,) long, -1 for the root
    scores: torch.Tensor  # (N,) float
    paths: torch.Tensor  # (N, D + 1) long: ancestor at each depth, -1 past the node's own depth

    @classmethod
    def rooted(cls, token: int | torch.Tensor, device: torch.device | str | None = None) -> "DraftTree":
        token = torch.as_tensor(token, dtype=torch.long, device=device).reshape(1)
        return cls(
            token,
            torch.full_like(token, -1),
            torch.zeros(1, device=token.device),
            torch.zeros(1, 1, dtype=torch.long, device=token.device),
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def extend(self, parents: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Add children (``parents``, ``tokens``, ``scores`` all ``(n,)``, on the device); their node ids."""
        first = len(self)
        ids = torch.arange(first, first + parents.shape[0], device=self.tokens.device)
        paths = torch.cat([self.paths, self.paths.new_full((len(self), 1), -1)], 1)  # one level deeper at most
        child = paths[parents].scatter(1, (self.depths()[parents] + 1)[:, None], ids[:, None])
        self.paths = torch.cat([paths, child])
        self.tokens = torch.cat([self.tokens, tokens.to(self.tokens.dtype)])
        self.parents = torch.cat([self.parents, parents.to(self.parents.dtype)])
        self.scores = torch.cat([self.scores, scores.to(self.scores.dtype)])
        return ids

    def add(self, parent: int, token: int, score: float) -> int:
        """Add one node from host values (hand-built trees); its id."""
        device = self.tokens.device
        self.extend(
            torch.tensor([parent], device=device),
            torch.tensor([token], device=device),
            torch.tensor([score], device=device),
        )
        return len(self) - 1

    def depths(self, device=None) -> torch.Tensor:
        """``(N,)`` each node's depth (root 0)."""
        depths = (self.paths >= 0).long().sum(1) - 1
        return depths if device is None else depths.to(device)

    def mask(self, device=None) -> torch.Tensor:
        """``(N, N)`` bool: node i may attend node j (j is i or an ancestor of i)."""
        size = len(self)
        index = self.paths.clamp_min(0)  # past a node's depth: the root, an ancestor of every node anyway
        allowed = torch.zeros(size, size, dtype=torch.bool, device=self.tokens.device)
        allowed.scatter_(1, index, torch.ones_like(index, dtype=torch.bool))
        return allowed if device is None else allowed.to(device)

    def select(self, total: int) -> "DraftTree":
        """The root and the ``total`` best-scoring nodes (ancestors first on ties), as a new tree in
        depth order; no host sync."""
        size = len(self)
        count = min(total, size - 1)
        ranked = torch.sort(self.scores[1:], descending=True, stable=True).indices[:count] + 1
        keep = torch.zeros(size, dtype=torch.bool, device=self.tokens.device)
        keep[0] = True
        keep[ranked] = True
        index = torch.arange(size, device=keep.device)
        key = torch.where(keep, self.depths() * size + index, 2 * size * size + index)
        order = torch.sort(key).indices[: count + 1]
        renumber = torch.full((size,), -1, dtype=torch.long, device=keep.device)
        renumber[order] = torch.arange(count + 1, device=keep.device)
        parents, paths = self.parents[order], self.paths[order]
        return DraftTree(
            self.tokens[order],
            torch.where(parents >= 0, renumber[parents.clamp_min(0)], -1),
            self.scores[order],
            torch.where(paths >= 0, renumber[paths.clamp_min(0)], -1),
        )

    def walk(self, choices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`~hasten.speculative.tree_accept` on this tree: ``(path (D + 1,), accepted, following)``."""
        choices = torch.as_tensor(choices, device=self.tokens.device)
        path, length, following = tree_accept(
            self.parents[None], self.tokens[None], choices[None], self.paths.shape[1] - 1
        )
        return path[0], length[0], following[0]

    def accept(self, choices) -> list[int]:
        """The accepted path (node indices, root first) given the target's greedy token after each node."""
        path, length, _ = self.walk(choices)
        return path[: int(length) + 1].tolist()

    def accept_sampled(self, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
        """Speculative sampling on the tree: ``(accepted path, root first; the token drawn after it)``.

        ``probs`` ``(nodes, vocab)``: the target's sampling distribution after each node (the
        point-mass rule: one draw per node, followed down the tree).
        """
        path, length, following = self.walk(draw(probs, generator))
        return path[: int(length) + 1].tolist(), int(following)
