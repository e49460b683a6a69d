"""Speculative acceptance and residual sampling: the two lossless rules, batched, on the device.

**Chain rule** (speculative sampling; SJD, SpecVLM chain drafting). Each draft token ``x_i`` was
drawn from a known distribution ``p_i``; the verifier's processed distribution there is
``q_i``. Draft ``i`` passes if ``r_i < min(1, q_i(x_i) / p_i(x_i))`` (``r_i ~ U(0, 1)``; with
``greedy``: if ``x_i == argmax q_i``). A row accepts the leading run of passes; the token after
the run is drawn from the residual ``normalize(max(0, q - p))`` at the first failure, or from
``q`` after the last draft when every draft passed. Each emitted token then follows ``q`` exactly.

Rows advance either by their own run (``shortest=False``) or all by the shortest run of the batch
(``shortest=True``, what the official SJD code does for a batch, so one KV cache keeps one
length). Under the shared rule a row whose own run is longer emits its (accepted) draft at the
shared position: an accepted draft is a draw from ``q`` as much as a residual draw is, and the
stopping point depends only on tests up to it, so every row stays exact.

**Point-mass tree rule** (SpecVLM / EAGLE-2 trees, whose children are the draft's top-k, not
samples). At each node, draw ``y ~ q`` (the target's distribution after the node; argmax when
greedy); if a child carries ``y``, step into it, otherwise ``y`` is the next token. Trying the
distinct children one by one as point masses (accept child ``x`` with probability
``r(x) / sum r``, else zero ``r(x)``, then draw from what is left) gives exactly this law; drawing
once is the same thing with no sequential host work.

Everything here is tensor code on the inputs' device: no ``.item()``/``.tolist()``.

Examples
--------
>>> import torch
>>> q = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]])      # (batch 1, 2 drafts + 1, vocab 2)
>>> verdict = chain_verify(torch.tensor([[1, 1]]), None, q, greedy=True)
>>> verdict.lengths.tolist(), verdict.advance.tolist(), verdict.tokens.tolist()
([1], [1], [0])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import draw

__all__ = ["ChainVerdict", "chain_verify", "residual", "tree_accept"]


@dataclass
class ChainVerdict:
    """The outcome of verifying a batch of draft chains (all tensors on the device).

    ``lengths`` ``(B,)`` each row's own run of accepted drafts; ``advance`` ``(B,)`` the drafts
    each row keeps (its run, or the batch's shortest run); ``tokens`` ``(B,)`` the token each row
    emits after them (the residual draw, the draw after the last draft, or, under the shared rule,
    the row's own accepted draft). Row ``b`` emits ``drafts[b, :advance[b]]`` then ``tokens[b]``.
    """

    lengths: torch.Tensor
    advance: torch.Tensor
    tokens: torch.Tensor


def residual(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """``normalize(max(0, target - draft))`` over the last dim; ``target`` where that has no mass
    (``target == draft``: then the draft was accepted with probability one and a draw from
    ``target`` is the exact replacement).

    Examples
    --------
    >>> import torch
    >>> residual(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])).tolist()
    [1.0, 0.0, 0.0]
    """
    rest = (target - draft).clamp_min(0)
    total = rest.sum(-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp_min(torch.finfo(rest.dtype).tiny), target)


def chain_verify(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    forced: torch.Tensor | None = None,
    also_accept: torch.Tensor | None = None,
    shortest: bool = False,
) -> ChainVerdict:
    """Verify ``B`` chains of ``W`` drafts at once (the chain rule of the module docstring).

    Parameters
    ----------
    drafts : (B, W) long
        Draft tokens (vocabulary indices; any value at ``forced`` positions).
    draft_probs : (B, W, V) or None
        The distribution each draft was drawn from (unused, may be None, when ``greedy``).
    target_probs : (B, W + 1, V)
        The verifier's processed distribution at each draft position and after the last draft.
    generator : torch.Generator, optional
        On the inputs' device; drives the acceptance tests and the draws.
    greedy : bool
        Exact-match acceptance and argmax replacement.
    forced : (W,) or (B, W) bool, optional
        Positions accepted unconditionally (tokens fixed by a layout, never sampled).
    also_accept : (B, W) bool, optional
        Extra acceptances decided by the caller (a LOSSY rule such as grouped acceptance).
    shortest : bool
        Every row advances by the batch's shortest run (one cache length for the batch).

    Examples
    --------
    >>> import torch
    >>> p = torch.full((2, 3, 4), 0.25)
    >>> verdict = chain_verify(torch.zeros(2, 3, dtype=torch.long), p, torch.full((2, 4, 4), 0.25),
    ...                        generator=torch.Generator().manual_seed(0))
    >>> verdict.lengths.tolist()                 # q == p: every draft passes
    [3, 3]
    """
    if drafts.dim() != 2 or target_probs.dim() != 3 or target_probs.shape[:2] != (drafts.shape[0], drafts.shape[1] + 1):
        raise ValueError(
            f"`drafts` (B, W) and `target_probs` (B, W + 1, V) do not fit: {tuple(drafts.shape)}, "
            f"{tuple(target_probs.shape)}"
        )
    if not greedy and (draft_probs is None or draft_probs.shape != target_probs[:, :-1].shape):
        raise ValueError("`draft_probs` (B, W, V) is required for sampled acceptance")
    rows, width = drafts.shape
    device = drafts.device
    safe = drafts.clamp_min(0)
    if greedy:
        passed = safe == target_probs[:, :-1].argmax(-1)
    else:
        q = target_probs[:, :-1].gather(2, safe[..., None])[..., 0]
        p = draft_probs.gather(2, safe[..., None])[..., 0]
        r = torch.rand(rows, width, generator=generator, device=device, dtype=q.dtype)
        passed = r * p < q  # r < q / p; p > 0 for every drawn token
    if forced is not None:
        passed = passed | forced.to(device)
    if also_accept is not None:
        passed = passed | also_accept
    lengths = passed.long().cumprod(1).sum(1)
    advance = lengths.min().expand(rows) if shortest else lengths
    at = advance.clamp_max(width)  # the position of the emitted token
    q_at = target_probs.gather(1, at[:, None, None].expand(-1, 1, target_probs.shape[2]))[:, 0]
    if greedy:
        drawn = q_at.argmax(-1)
    else:
        inside = at.clamp_max(width - 1) if width else at
        p_at = (
            draft_probs.gather(1, inside[:, None, None].expand(-1, 1, draft_probs.shape[2]))[:, 0]
            if width
            else torch.zeros_like(q_at)
        )
        p_at = torch.where((at < width)[:, None], p_at, 0.0)
        drawn = draw(residual(q_at, p_at), generator)
    if shortest and width:
        own = drafts.gather(1, at.clamp_max(width - 1)[:, None])[:, 0]
        drawn = torch.where(lengths > advance, own, drawn)  # this row's draft passed there: it is the token
    return ChainVerdict(lengths=lengths, advance=advance, tokens=drawn)


def tree_accept(
    parents: torch.Tensor, tokens: torch.Tensor, choices: torch.Tensor, max_depth: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk ``B`` draft trees from their roots along the target's choices (the point-mass rule).

    Parameters
    ----------
    parents, tokens : (B, N) long
        Each node's parent (``-1`` for the root, node 0) and token; sibling tokens are distinct.
    choices : (B, N) long
        The target's token after each node: its argmax (greedy), or one draw from its processed
        distribution there (sampling).
    max_depth : int
        The trees' depth (the walk takes at most this many steps).

    Returns
    -------
    path : (B, max_depth + 1) long
        Accepted nodes, root first, ``-1`` after the walk stopped.
    length : (B,) long
        Accepted drafted nodes (the root not counted).
    following : (B,) long
        The token after the accepted path (the choice at its last node).

    Examples
    --------
    >>> import torch
    >>> parents, tokens = torch.tensor([[-1, 0, 0, 1]]), torch.tensor([[7, 1, 2, 3]])
    >>> path, length, following = tree_accept(parents, tokens, torch.tensor([[1, 3, 0, 9]]), 2)
    >>> path.tolist(), length.tolist(), following.tolist()
    ([[0, 1, 3]], [2], [9])
    """
    rows = parents.shape[0]
    device = parents.device
    current = torch.zeros(rows, dtype=torch.long, device=device)
    path = torch.full((rows, max_depth + 1), -1, dtype=torch.long, device=device)
    path[:, 0] = 0
    alive = torch.ones(rows, dtype=torch.bool, device=device)
    for depth in range(1, max_depth + 1):
        wanted = choices.gather(1, current[:, None])
        match = (parents == current[:, None]) & (tokens == wanted)
        found = match.any(1) & alive
        child = match.long().argmax(1)
        current = torch.where(found, child, current)
        path[:, depth] = torch.where(found, child, -1)
        alive = found
    length = (path[:, 1:] >= 0).long().sum(1)
    return path, length, choices.gather(1, current[:, None])[:, 0]
