"""Optional dependencies: import one when a feature needs it, or fail with a UserError that says how to
install it: the pip command of this very Python, with the version each of gpt2train's extras asks for
(pyproject.toml's optional dependencies)."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shlex
import sys
from types import ModuleType

from .errors import UserError


def require(module: str, purpose: str, extra: str, *, needs: str | None = None, then: str = "") -> ModuleType:
    """`module` imported (a submodule such as "pyarrow.parquet" is returned itself), or a UserError:
    "<purpose> needs <needs>: install it with `<this python> -m pip install '<package>'`<then>".

    `needs` defaults to "the <top-level package> package"; `then` is a further step after installing.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        needs = needs or f"the {module.split('.')[0]} package"
        raise UserError(f"{purpose} needs {needs}: install it with `{install_command(extra, module)}`{then}") from None


def install_command(extra: str, module: str) -> str:
    """The command that installs what gpt2train's `extra` lists for `module` into the running Python
    (which works whatever made the environment: scripts/install.sh's .venv, a conda env, ...)."""
    specs = _extra_requirements(extra)
    package = module.split(".")[0]
    mine = [spec for spec in specs if re.split(r"[<>=!~; \[]", spec, maxsplit=1)[0].lower() == package.lower()]
    wanted = mine or specs or [package]
    return f"{shlex.quote(sys.executable)} -m pip install {' '.join(shlex.quote(spec) for spec in wanted)}"


def _extra_requirements(extra: str) -> list[str]:
    """What gpt2train's metadata lists for `extra` ("matplotlib>=3.7"), or [] when it is not installed
    as a package (run from a source tree)."""
    try:
        requirements = importlib.metadata.requires("gpt2train") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    marker = re.compile(r""";\s*extra\s*==\s*["']""" + re.escape(extra) + r"""["']\s*$""")
    return [r.split(";")[0].strip() for r in requirements if marker.search(r)]


def require_safetensors(purpose: str = "the safetensors format", extra: str = "safetensors") -> ModuleType:
    """The safetensors package with its torch functions loaded (`safetensors.torch.save`, `.load_file`),
    or the UserError of `require`."""
    safetensors = require("safetensors", purpose, extra)
    require("safetensors.torch", purpose, extra)
    return safetensors
