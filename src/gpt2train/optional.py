"""Optional dependencies: import one when a feature needs it, or fail with a UserError that says how to
install it (each feature's packages are an extra of gpt2train: `pip install 'gpt2train[EXTRA]'`)."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserError


def require(module: str, purpose: str, extra: str, *, needs: str | None = None, then: str = "") -> ModuleType:
    """`module` imported (a submodule such as "pyarrow.parquet" is returned itself), or a UserError:
    "<purpose> needs <needs>: pip install 'gpt2train[<extra>]'<then>".

    `needs` defaults to "the <top-level package> package"; `then` is a further step after installing.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        needs = needs or f"the {module.split('.')[0]} package"
        raise UserError(f"{purpose} needs {needs}: pip install 'gpt2train[{extra}]'{then}") from None


def require_safetensors(purpose: str = "the safetensors format", extra: str = "safetensors") -> ModuleType:
    """The safetensors package with its torch functions loaded (`safetensors.torch.save`, `.load_file`),
    or the UserError of `require`."""
    safetensors = require("safetensors", purpose, extra)
    require("safetensors.torch", purpose, extra)
    return safetensors
