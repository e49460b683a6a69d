"""Deprecated location of SpecVLM: it moved to :mod:`hasten.speculative.specvlm` (it prunes nothing).

Importing this package (or ``hasten.token_pruning.SpecVLM``) keeps working for one release and
emits a :class:`DeprecationWarning`; its submodules (``.tree``, ``.draft``, ...) are the new
package's own modules.

Examples
--------
>>> import warnings
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore", DeprecationWarning)
...     from hasten.token_pruning.specvlm import SpecVLM
>>> SpecVLM.__module__
'hasten.speculative.specvlm.decoding'
"""

import sys
import warnings

from ...speculative import specvlm as _new
from ...speculative.specvlm import *  # noqa: F401,F403 - the re-exported public names
from ...speculative.specvlm import __all__  # noqa: F401

warnings.warn(
    "hasten.token_pruning.specvlm moved to hasten.speculative.specvlm (import SpecVLM from "
    "hasten.speculative); the old path is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)

for _name in ("compressor", "decoding", "draft", "train", "tree"):
    sys.modules[f"{__name__}.{_name}"] = getattr(_new, _name)
