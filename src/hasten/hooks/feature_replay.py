"""Record projection features into a :class:`FeatureCache`, replay them later: the one record/replay mechanism.

Attention-feature editing runs a pass that computes features (an inversion, a source
reconstruction) and a later pass that puts some of them back: ConsistEdit's source branch gets
its inverted Q/K/V back, masked K/V replay (VoxHammer, KV-Edit) overwrites the preserved tokens'
K/V. Both are the same three steps, which live here once:

- a **key**: ``(noise level, layer, kind)`` — the noise level rounded to 6 digits, so the
  inversion and the editing pass meet at the same levels;
- **record**: the chosen batch rows (``batch_rows``; all by default) and token rows (``rows``:
  region-only storage, e.g. the preserved tokens) of a projection's features go into the cache;
- **replay**: the recorded features overwrite the same token rows of the chosen batch rows, one
  recorded row per batch row, or one recorded row broadcast to every batch row (a guidance-1
  inversion replayed into a CFG batch). A level that was never recorded (the midpoint solver's
  first editing level, sigma = 1) is left alone; :attr:`FeatureReplay.replayed` counts what was
  replayed, so a run that replays nothing can be told apart.

:class:`FeatureReplay` is used two ways: standalone, through :meth:`FeatureReplay.attach`, which
registers one :class:`ProjectionReplayHook` per projection site in diffusers' ``HookRegistry``
(VoxHammer's fused ``to_qkv``), or called from another hook that also edits the same projection
(:class:`~hasten.hooks.consistedit.ConsistEditControl` copies source features into
the target branch right after replaying the source's).

Examples
--------
>>> import torch
>>> from hasten.hooks.feature_cache import FeatureCache, FeatureCacheConfig
>>> proj = torch.nn.Linear(4, 4)
>>> replay = FeatureReplay(FeatureCache(FeatureCacheConfig(dtype="float32")), rows=torch.tensor([0]))
>>> _ = replay.attach([ProjectionSite(0, "k", proj)])
>>> x = torch.randn(1, 2, 4)
>>> replay.mode, replay.sigma = "record", 0.5
>>> recorded = proj(x)
>>> replay.mode = "replay"
>>> out = proj(torch.randn(1, 2, 4))                  # token 0 comes back from the recording
>>> torch.equal(out[:, 0], recorded[:, 0]), replay.replayed
(True, 1)
>>> replay.detach()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .feature_cache import FeatureCache

__all__ = ["FeatureReplay", "ProjectionReplayHook", "ProjectionSite", "ReplayMode"]

ReplayMode = Literal["off", "record", "replay"]
_MODES = ("off", "record", "replay")
_HOOK_PREFIX = "hasten_feature_replay"


def _everything(output: torch.Tensor) -> torch.Tensor:
    return output


@dataclass(frozen=True)
class ProjectionSite:
    """One projection whose output holds features to record / replay.

    ``select(output)`` returns the features as a VIEW ``(batch, tokens, channels)`` of the output
    (writes land in it): e.g. the K/V channels of a fused ``to_qkv``, or the image tokens after
    the text tokens of a joint projection.
    """

    layer: int
    kind: str
    module: torch.nn.Module
    select: Callable[[torch.Tensor], torch.Tensor] = _everything


class FeatureReplay:
    """Record / replay features per ``(noise level, layer, kind)`` over a :class:`FeatureCache`.

    Parameters
    ----------
    cache : FeatureCache
        Where recordings live (bounded: dtype, int8, disk spill, region-only).
    rows : LongTensor, optional
        Token rows recorded and replayed (None: every token).
    """

    def __init__(self, cache: FeatureCache, rows: torch.Tensor | None = None):
        self.cache, self.rows = cache, rows
        self._mode: ReplayMode = "off"
        self.sigma: float = 1.0
        self.batch_rows: list[int] | None = None  # batch rows recorded from / replayed into (None: all)
        self.recorded = 0
        self.replayed = 0
        self._names: list[tuple[torch.nn.Module, str]] = []

    @property
    def mode(self) -> ReplayMode:
        return self._mode

    @mode.setter
    def mode(self, value: ReplayMode) -> None:
        if value not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {value!r}")
        self._mode = value

    def key(self, layer: int, kind: str) -> tuple[float, int, str]:
        return (round(float(self.sigma), 6), layer, kind)

    # --- the mechanism -------------------------------------------------------------------------------
    def record(self, layer: int, kind: str, features: torch.Tensor, rows: torch.Tensor | None | bool = True) -> None:
        """Store ``features`` ``(batch, tokens, channels)`` (its ``batch_rows``) under this level's key.

        ``rows``: the token rows to keep; True (default) = :attr:`rows`, None = every token."""
        chosen = features if self.batch_rows is None else features[self.batch_rows]
        self.cache.put(self.key(layer, kind), chosen, rows=self.rows if rows is True else rows)
        self.recorded += 1

    def replay(self, layer: int, kind: str, features: torch.Tensor) -> bool:
        """Overwrite the recorded token rows of ``features`` (a view, edited in place) with the recording
        of this level; False when this level was not recorded."""
        key = self.key(layer, kind)
        if key not in self.cache:
            return False
        recorded, rows = self.cache.get(key, device=features.device)
        targets = list(range(features.shape[0])) if self.batch_rows is None else self.batch_rows
        if recorded.shape[0] not in (1, len(targets)):
            raise ValueError(
                f"recorded {recorded.shape[0]} batch rows for layer {layer} {kind!r} at sigma "
                f"{key[0]}; cannot replay them into {len(targets)} rows"
            )
        recorded = recorded.to(features.dtype)
        for index, target in enumerate(targets):
            source = recorded[0 if recorded.shape[0] == 1 else index]
            if rows is None:
                features[target] = source
            else:
                features[target, rows] = source
        self.replayed += 1
        return True

    def __call__(
        self, layer: int, kind: str, output: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor] = _everything
    ) -> torch.Tensor:
        """Apply the current mode to one projection output; returns the (possibly edited) output."""
        if self._mode == "record":
            self.record(layer, kind, select(output).detach())
            return output
        if self._mode == "replay":
            out = output.clone() if output.requires_grad else output  # a fresh projection: edited in place
            self.replay(layer, kind, select(out))
            return out
        return output

    # --- standalone hooks ------------------------------------------------------------------------------
    def attach(self, sites: list[ProjectionSite]) -> "FeatureReplay":
        """Register one :class:`ProjectionReplayHook` per site (diffusers ``HookRegistry``)."""
        if self._names:
            raise ValueError("this FeatureReplay is already attached; detach() first")
        for site in sites:
            name = f"{_HOOK_PREFIX}_{site.layer}_{site.kind}"
            registry = HookRegistry.check_if_exists_or_initialize(site.module)
            if registry.get_hook(name) is not None:
                raise ValueError(
                    f"{type(site.module).__name__} already has a feature replay hook for layer "
                    f"{site.layer} {site.kind!r}; remove the other one first"
                )
            registry.register_hook(ProjectionReplayHook(self, site), name)
            self._names.append((site.module, name))
        return self

    def detach(self) -> None:
        """Remove the hooks :meth:`attach` registered (the modules' forwards are restored exactly)."""
        for module, name in self._names:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(name) is not None:
                registry.remove_hook(name, recurse=False)
        self._names = []


class ProjectionReplayHook(ModelHook):
    """A projection's post-forward hook that hands its output to a :class:`FeatureReplay`."""

    def __init__(self, replay: FeatureReplay, site: ProjectionSite):
        super().__init__()
        self.replay, self.site = replay, site

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return self.replay(self.site.layer, self.site.kind, output, self.site.select)
