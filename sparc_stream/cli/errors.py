"""Errors the CLI reports as one line (no traceback)."""


class UserError(Exception):
    """Something the user can fix: a bad argument, a missing or malformed file."""


# Top-level modules of the optional installs (pyproject's extras): the base install is numpy + safetensors.
_EXTRAS = {
    "subscriber": ("kafka", "cryptography"),
    "full": ("torch", "faiss", "faust", "mode", "aiokafka", "rocksdict", "pydantic", "pydantic_settings",
             "prometheus_client", "tqdm", "matplotlib"),
}


def extra_providing(module: str | None) -> str | None:
    """The extra whose install brings `module` (a dotted name is judged by its top level), or None."""
    top = (module or "").split(".")[0]
    return next((extra for extra, modules in _EXTRAS.items() if top in modules), None)
