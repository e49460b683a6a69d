"""Load a model by name: an embedded tiny model ("tiny-flux", "tiny-llava", ...), a hub id or a local folder.

:func:`resolve_model` is the one place that decides what a ``--model`` names, before anything
heavy runs: a local folder must hold a model (``model_index.json`` for diffusers pipelines,
``config.json`` for transformers models); a Hub id already in the Hugging Face cache loads from
the cache without contacting the Hub; an id that is not cached is downloaded when the Hub is
reachable, and otherwise (offline, ``HF_HUB_OFFLINE=1``, no network) fails at once with a
``ValueError`` that names the id and says how to pass a local folder: no retries, no traceback.
:func:`check_device` does the same for ``--device``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from . import tiny

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


MICRO_WORLDS: dict[str, str] = {"micro-flux": "flux", "micro-sd15": "sd15"}
"""``--model`` names of the trained diffusion micro-worlds (shipped weights, real pictures) -> their
:data:`hasten.tiny.trained.REGISTRY` names: FLUX (GRAT, editing) and Stable Diffusion 1.5 (LatentWarp)."""

MARKERS = {"diffusers": "model_index.json", "transformers": "config.json"}
_KINDS = {"diffusers": "a diffusers pipeline", "transformers": "a transformers model"}


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def check_device(device: str | None, argument: str = "--device") -> str:
    """``device`` (default: :func:`default_device`) if this machine has it, else a clear ``ValueError``.

    Examples
    --------
    >>> check_device("cpu")
    'cpu'
    >>> check_device("gpu")
    Traceback (most recent call last):
    ...
    ValueError: --device 'gpu' is not a device; use cpu, cuda or cuda:N (default: cuda when available)
    """
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{argument} {device!r} is not a device; use cpu, cuda or cuda:N (default: cuda when available)"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{argument} {device}: CUDA is not available on this machine (no GPU, or torch "
                f"{torch.__version__} built without CUDA); use {argument} cpu, or leave it out"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"{argument} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif parsed.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{argument} {device!r}: use cpu, cuda or cuda:N (default: cuda when available)")
    elif parsed.type != "cpu" and not getattr(torch, parsed.type).is_available():
        raise ValueError(f"{argument} {device}: {parsed.type} is not available on this machine; use {argument} cpu")
    return device


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def resolve_model(model: str, kind: str = "diffusers", argument: str = "--model", tiny_names=()) -> str:
    """What ``from_pretrained`` should load for ``model``: a local folder, a cached snapshot or a Hub id.

    Parameters
    ----------
    model : str
        A local folder, or a Hub id (``owner/name``).
    kind : {"diffusers", "transformers"}
        What the folder must hold: ``model_index.json`` (a diffusers pipeline) or ``config.json``.
    argument : str
        The option named in errors.
    tiny_names : iterable of str
        The embedded tiny models this option also accepts (named in errors).

    Raises
    ------
    ValueError
        At once, naming ``model``: a path that is a file, a folder that is not a model, a name that
        is neither a folder nor a valid Hub id, an id that is not cached while the Hub cannot be
        reached (offline), or an id the Hub does not know.

    Examples
    --------
    >>> resolve_model("/")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --model /: this folder is not a diffusers pipeline (no model_index.json); pass a folder ...
    """
    if kind not in MARKERS:
        raise ValueError(f"`kind` must be one of {sorted(MARKERS)}, got {kind!r}")
    marker, what = MARKERS[kind], _KINDS[kind]
    tiny_hint = f", or one of {', '.join(tiny_names)}" if tiny_names else ""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            raise ValueError(
                f"{argument} {model}: this folder is not {what} (no {marker}); pass a folder saved "
                f"with save_pretrained, or a Hub id{tiny_hint}"
            )
        return str(path)
    if path.exists():
        raise ValueError(f"{argument} {model} is a file; pass a model folder (holding {marker}), a Hub id{tiny_hint}")
    from huggingface_hub import constants, model_info, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        snapshot = Path(snapshot_download(model, local_files_only=True))
    except HFValidationError:
        raise ValueError(
            f"{argument} {model!r} is neither a local folder nor a Hub id (owner/name){tiny_hint}"
        ) from None
    except (LocalEntryNotFoundError, OSError):
        snapshot = None
    if snapshot is not None and (snapshot / marker).is_file():
        return str(snapshot)  # in the cache: no network needed
    how = (
        f"download it once with network (`hf download {model}`), or pass a local folder: "
        f"{argument} /path/to/model{tiny_hint}"
    )
    if _offline():
        raise ValueError(
            f"{argument} {model}: not a local folder and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set; {how}"
        )
    try:
        model_info(model, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError) as error:
        reason = (
            "is gated (log in with `hf auth login`)"
            if isinstance(error, GatedRepoError)
            else "is not on the Hugging Face Hub (or is private)"
        )
        raise ValueError(
            f"{argument} {model}: not a local folder, and {reason}; pass a local folder: "
            f"{argument} /path/to/model{tiny_hint}"
        ) from None
    except Exception as error:  # noqa: BLE001 - any network failure means: offline
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{argument} {model}: not a local folder and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and the Hub cannot be reached ({reason}); {how}"
        ) from None
    return model


def pipeline_source(model: str, argument: str = "--model") -> str | None:
    """None for an embedded pipeline (a tiny model or a trained micro-world, :data:`MICRO_WORLDS`), else what
    ``DiffusionPipeline.from_pretrained`` loads (see :func:`resolve_model`); a clear ``ValueError`` for anything
    else, before anything loads.

    Examples
    --------
    >>> pipeline_source("tiny-flux") is None, pipeline_source("micro-sd15") is None
    (True, True)
    """
    if tiny.is_tiny(model) or model in MICRO_WORLDS:
        return None
    if model.startswith("tiny-") and not Path(model).exists():
        raise ValueError(
            f"{argument} {model!r} is not an embedded tiny model; choose {', '.join(tiny.MODEL_IDS)}, "
            "a diffusers model id or a local folder"
        )
    return resolve_model(model, "diffusers", argument, tiny_names=tuple(tiny.MODEL_IDS))


def working_size(model: str) -> dict[str, int]:
    """The size the CLI and apps work at for ``model`` when none is given: an embedded tiny model's own
    (:func:`hasten.tiny.default_size`, known by its name), else ``{}`` (the pipeline's own defaults).

    Examples
    --------
    >>> working_size("tiny-flux"), working_size("black-forest-labs/FLUX.1-dev")
    ({'height': 36, 'width': 52}, {})
    """
    return dict(tiny.default_size(tiny.MODEL_IDS[model])) if tiny.is_tiny(model) else {}


def load_pipeline(model: str, dtype: str | torch.dtype | None = None, device: str | None = None) -> DiffusionPipeline:
    """A ready diffusers pipeline for ``model``.

    Parameters
    ----------
    model : str
        ``"micro-flux"``, ``"micro-sd15"`` (the trained micro-worlds, :data:`MICRO_WORLDS`), ``"tiny-flux"``,
        ``"tiny-sd3"``, ... (offline random-weight models, see :mod:`hasten.tiny`), or any diffusers model id /
        local folder, loaded with ``DiffusionPipeline.from_pretrained``.
    dtype : str or torch.dtype, optional
        Default float32 for tiny models, micro-worlds and on CPU, bfloat16 on CUDA.
    device : str, optional
        Default "cuda" when available, else "cpu".

    Examples
    --------
    >>> from hasten.loading import load_pipeline
    >>> type(load_pipeline("tiny-flux")).__name__
    'FluxPipeline'
    """
    device = check_device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    source = pipeline_source(model)
    if model in MICRO_WORLDS:
        from .tiny import trained

        name = MICRO_WORLDS[model]
        if not trained.is_shipped(name):
            raise ValueError(
                f"--model {model}: no trained weights in {trained.path(name)}; train them with `hasten tiny train {name}`"
            )
        pipe = trained.load(name, dtype=dtype or torch.float32)
    elif source is None:
        pipe = tiny.pipeline(tiny.MODEL_IDS[model], torch_dtype=dtype or torch.float32)
    else:
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        try:
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
        except (OSError, ValueError, KeyError) as error:  # a broken folder or an incomplete download
            raise ValueError(
                f"--model {model}: cannot load it as a diffusers pipeline from {source} ({_first_line(error)})"
            ) from None
    return pipe.to(device)


def load_transformers_model(model: str, tiny_models: dict, device: str | None = None):
    """A transformers image-text model and its processor, in eval mode on ``device``.

    Parameters
    ----------
    model : str
        A key of ``tiny_models`` (e.g. ``"tiny-llava"``) or a hub id / local folder, loaded with
        ``AutoModelForImageTextToText`` + ``AutoProcessor`` (bfloat16 on CUDA, float32 elsewhere).
    tiny_models : dict
        Tiny model names -> zero-argument loaders returning ``(model, processor)``.
    device : str, optional
        Default "cuda" when available, else "cpu".

    Examples
    --------
    >>> from hasten import tiny
    >>> model, processor = load_transformers_model("tiny-llava", {"tiny-llava": lambda: tiny.vlm("llava")})
    >>> type(model).__name__
    'LlavaForConditionalGeneration'
    """
    device = check_device(device)
    if model in tiny_models:
        loaded, processor = tiny_models[model]()
    elif model.startswith("tiny-") and not Path(model).exists():
        raise ValueError(f"unknown tiny model {model!r}; choose {', '.join(tiny_models)} or a hub id")
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = resolve_model(model, "transformers", tiny_names=tuple(tiny_models))
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            loaded = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
            processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError, KeyError) as error:  # a broken folder, an incomplete download, another kind
            raise ValueError(
                f"--model {model}: cannot load it as an image-text model from {source} ({_first_line(error)})"
            ) from None
    return loaded.to(device).eval(), processor
