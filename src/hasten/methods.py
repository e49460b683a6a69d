"""One front door: ``hasten.apply(model_or_pipe, config)`` turns a method on, ``hasten.remove`` undoes it.

Every method hasten attaches to a model is a config (a dataclass with the paper's defaults) and
one row of :data:`METHODS`: the config class, where on the target the method lives (a
pipeline's transformer, the VLM itself, a UNet), and the method's own ``prepare`` / ``attach`` /
``detach`` functions. :func:`apply` looks the config up, attaches it, and returns a
:class:`Handle`; the handle is also a context manager. Removing restores the model exactly: the
original processors, hooks and forwards, and bit-identical outputs (``tests/test_methods.py``
checks this per method).

The familiar spellings are thin wrappers over these two functions: ``pipe.enable_grat()`` /
``pipe.disable_grat()`` (and :func:`hasten.hooks.grat.apply_grat` / ``remove_grat``),
``with HiRED(0.2).apply(model):`` and ``pruner.attach(model)`` / ``pruner.detach()``.

Rules:

- One method of a kind per model: applying a second config of the same method to the same
  model replaces the first (the new config is checked first; if it then fails to attach, the
  method is off). Re-applying the stateful config object already in effect (a pruner or a
  SpecVLM, which hold their last call's stats; not a frozen config) raises instead.
- Methods of different kinds may sit on one model at once; each handle removes only its own.
- :func:`remove` of something that is not applied raises ``ValueError``; ``Handle.remove()``
  twice is a no-op (so a handle removed inside its ``with`` block exits cleanly).

This module imports nothing heavy: each row names its functions by import path, loaded when a
config of that method is applied (the config's own module is then already imported).

Examples
--------
>>> import hasten, hasten.tiny
>>> pipe = hasten.tiny.pipeline("flux")
>>> with hasten.apply(pipe, hasten.GratConfig(group_size=4)) as handle:
...     handle.config.group_size
(1, 4, 4)
>>> hasten.applied(pipe)
[]
"""

from __future__ import annotations

import importlib
import weakref
from dataclasses import dataclass
from typing import Any

__all__ = ["METHODS", "Handle", "Method", "applied", "apply", "method_for", "remove"]


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Method:
    """How one method attaches: its config class and four functions, each named ``"module:name"``.

    - ``locate(target) -> module``: the object the method changes (a pipeline's transformer, the VLM,
      a UNet); a ``ValueError`` naming the target if it has none.
    - ``prepare(module, config) -> config in effect``: validation and family defaults, no side effect.
    - ``attach(module, config in effect)``: install; a failure part-way removes what it installed.
    - ``detach(module, config in effect)``: uninstall, restoring the originals exactly.

    ``config`` is a config class the method accepts (subclasses too, e.g. every ``TokenPruner``).
    ``refuse`` (optional), instead of the four functions: a config this front door does not attach,
    with the sentence that says why and which entry point to use.
    """

    name: str
    config: str
    locate: str = ""
    prepare: str = ""
    attach: str = ""
    detach: str = ""
    refuse: str = ""

    def call(self, step: str, *args: Any) -> Any:
        return _load(getattr(self, step))(*args)


#: The methods reachable through :func:`apply`, in the order the docs list them.
METHODS: tuple[Method, ...] = (
    Method(
        "GRAT",
        "hasten.hooks.grat:GratConfig",
        locate="hasten.hooks.grat:grat_module",
        prepare="hasten.hooks.grat:prepare_grat",
        attach="hasten.hooks.grat:install_grat",
        detach="hasten.hooks.grat:uninstall_grat",
    ),
    Method(
        "token pruning",
        "hasten.token_pruning.core:TokenPruner",
        locate="hasten.token_pruning.core:pruning_target",
        prepare="hasten.token_pruning.core:prepare_pruner",
        attach="hasten.token_pruning.core:attach_pruner",
        detach="hasten.token_pruning.core:detach_pruner",
    ),
    Method(
        "cross-frame attention",
        "hasten.hooks.cross_frame:CrossFrameConfig",
        locate="hasten.hooks.cross_frame:cross_frame_unet",
        prepare="hasten.hooks.cross_frame:prepare_cross_frame",
        attach="hasten.hooks.cross_frame:attach_cross_frame",
        detach="hasten.hooks.cross_frame:detach_cross_frame",
    ),
    Method(
        "ConsistEdit attention control",
        "hasten.hooks.consistedit:ConsistEditConfig",
        locate="hasten.hooks.consistedit:consistedit_transformer",
        prepare="hasten.hooks.consistedit:prepare_consistedit",
        attach="hasten.hooks.consistedit:attach_consistedit",
        detach="hasten.hooks.consistedit:detach_consistedit",
    ),
    Method(
        "SpecVLM",
        "hasten.speculative.specvlm.decoding:SpecVLM",
        locate="hasten.speculative.specvlm.decoding:specvlm_target",
        prepare="hasten.speculative.specvlm.decoding:prepare_specvlm",
        attach="hasten.speculative.specvlm.decoding:attach_specvlm",
        detach="hasten.speculative.specvlm.decoding:detach_specvlm",
    ),
    Method(
        "SJD",
        "hasten.pipelines.sjd:SJDConfig",
        refuse="`config`: SJD is not attached to a model, it is a decoding loop of its own (its Jacobi window, "
        "image-token vocabulary and classifier-free-guidance pairs do not fit generate()); run it as "
        "SJDPipeline(model, processor)(prompt, sjd=SJDConfig(...)) (see docs/architecture.md)",
    ),
)


def method_for(config: Any) -> Method:
    """The row of :data:`METHODS` for a config, or a config class (subclasses match their base's row).

    Raises ``TypeError`` naming ``config`` and every accepted config class otherwise.
    """
    cls = config if isinstance(config, type) else type(config)
    names = {f"{c.__module__}:{c.__qualname__}" for c in cls.__mro__}
    for method in METHODS:
        if method.config in names:
            return method
    accepted = ", ".join(m.config.partition(":")[2] for m in METHODS)
    raise TypeError(f"`config` must be a method config ({accepted}, or a subclass); got {cls.__name__}")


class Handle:
    """One method applied to one model: :meth:`remove` undoes it; ``with`` removes it on exit.

    Attributes
    ----------
    config : the config in effect (GRAT: with the family's defaults filled in; a pruner: the pruner
        itself, whose ``stats`` hold the last call's numbers)
    target : what was passed to :func:`apply` (a pipeline or a model)
    module : the object the method changed (a pipeline's transformer, the VLM, ...)
    method : the :class:`Method` row
    active : False once removed
    """

    def __init__(self, method: Method, target: Any, module: Any, config: Any):
        self.method, self.target, self.module, self.config = method, target, module, config
        self.active = True

    def remove(self) -> None:
        """Undo the method (a no-op if this handle was already removed or replaced)."""
        if not self.active:
            return
        self.active = False
        handles = _APPLIED.get(self.module)
        if handles is not None and handles.get(self.method.name) is self:
            del handles[self.method.name]
        self.method.call("detach", self.module, self.config)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "on" if self.active else "removed"
        return f"<hasten.Handle {self.method.name} on {type(self.module).__name__} ({state}): {self.config!r}>"


# module the method changed -> {method name: live handle}; weak, so a handle never keeps a model alive
_APPLIED: "weakref.WeakKeyDictionary[Any, dict[str, Handle]]" = weakref.WeakKeyDictionary()


def apply(target: Any, config: Any) -> Handle:
    """Turn the method ``config`` describes on for ``target``; returns its :class:`Handle`.

    Parameters
    ----------
    target : a diffusers pipeline, a diffusers transformer, or a transformers VLM (what the method
        acts on; see the table in ``docs/architecture.md``)
    config : a method config: ``GratConfig(...)``, a token pruner (``HiRED(...)``, ``FastV(...)``, ...)

    A config of a method already applied to the same model replaces it.

    Examples
    --------
    >>> import hasten, hasten.tiny
    >>> from hasten.token_pruning import HiRED
    >>> model, processor = hasten.tiny.vlm("llava")
    >>> handle = hasten.apply(model, HiRED(budget=0.5))
    >>> handle.method.name, handle.config.budget
    ('token pruning', 0.5)
    >>> hasten.remove(model)
    """
    if isinstance(config, type):
        raise TypeError(f"`config` must be a config instance, e.g. {config.__name__}(), not the class")
    method = method_for(config)
    if method.refuse:
        raise ValueError(method.refuse)
    module = method.call("locate", target)
    current = _APPLIED.get(module, {}).get(method.name)
    if current is not None and current.config is config and not _frozen(config):
        raise ValueError(
            f"this {type(config).__name__} is already attached to this {type(module).__name__}; "
            "remove it first (hasten.remove, or its handle's remove())"
        )
    in_effect = method.call("prepare", module, config)
    if current is not None:
        current.remove()
    method.call("attach", module, in_effect)
    handle = Handle(method, target, module, in_effect)
    _APPLIED.setdefault(module, {})[method.name] = handle
    return handle


def _frozen(config: Any) -> bool:
    params = getattr(type(config), "__dataclass_params__", None)
    return bool(params is not None and params.frozen)


def _components(target: Any) -> list[Any]:
    """``target`` and, for a pipeline, its components (where its methods live); each also unwrapped from
    ``torch.compile`` (methods change the original module)."""
    components = getattr(target, "components", None)
    found = [target, *(components.values() if isinstance(components, dict) else ())]
    return found + [o for o in (getattr(c, "_orig_mod", None) for c in found) if o is not None]


def applied(target: Any) -> list[Handle]:
    """The live handles on ``target`` (a pipeline: on it and its components), in the order applied."""
    found = []
    for obj in _components(target):
        try:
            handles = _APPLIED.get(obj)
        except TypeError:  # unhashable or not weak-referenceable: nothing can be applied to it
            continue
        found += [h for h in (handles or {}).values() if h not in found]
    return found


def remove(target: Any, what: Any = None) -> None:
    """Undo :func:`apply`: exactly the original model (processors, hooks, forwards, outputs) again.

    Parameters
    ----------
    target : what a method was applied to (a pipeline also finds the methods on its components)
    what : optional: a :class:`Handle`, a config or a config class (removes that method); default:
        every method applied to ``target``

    Raises ``ValueError`` naming the target if nothing (or not that method) is applied to it.

    Examples
    --------
    >>> import hasten, hasten.tiny
    >>> pipe = hasten.tiny.pipeline("flux")
    >>> _ = hasten.apply(pipe, hasten.GratConfig())
    >>> hasten.remove(pipe, hasten.GratConfig)
    """
    if isinstance(what, Handle):
        if not what.active:
            raise ValueError(f"`what`: this {what.method.name} handle was already removed")
        if what.target is not target and what not in applied(target):
            raise ValueError(
                f"`what`: this {what.method.name} handle belongs to another model, not this {type(target).__name__}"
            )
        what.remove()
        return
    handles = applied(target)
    if what is not None:
        method = method_for(what)
        handles = [h for h in handles if h.method is method]
        if not handles:  # e.g. applied to a pipeline's transformer, removed through another spelling of it
            try:
                module = method.call("locate", target)
            except (ValueError, TypeError):
                module = None
            handles = [h for h in applied(module) if h.method is method] if module is not None else []
    if not handles:
        wanted = f"{method_for(what).name} is not" if what is not None else "no method is"
        raise ValueError(f"`target`: {wanted} applied to this {type(target).__name__}; nothing to remove")
    for handle in reversed(handles):
        handle.remove()
