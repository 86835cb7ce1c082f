"""`sparc config show`: the effective settings (flags aside: the config file, SPARC_* variables and defaults) as
TOML, secrets masked. Its output is a valid --config file (unset settings are commented out; a secret given
directly, not through its *_file, prints masked and must be put back)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sparc_stream.cli.worker import add_config_argument, build_settings

MASK = "**********"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="show the effective settings (config file + SPARC_* environment + defaults), secrets masked",
        description="Settings come, first match wins, from command-line flags, SPARC_<FIELD> environment "
        "variables, the --config TOML file and the defaults (streams/settings.py).",
    )
    actions = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show",
        help="print the effective settings as TOML (or JSON), secrets masked",
        description="Print every setting as the worker would see it with this config file and this environment, "
        "grouped in the config file's sections. Secrets (sasl_password, ssl_key_password) print as "
        f"{MASK!r} when set. The TOML output is a valid --config file.",
    )
    add_config_argument(show)
    show.add_argument("--format", choices=["toml", "json"], default="toml", help="output format (default toml)")
    show.set_defaults(func=run_show)


def effective(settings) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} in SECTIONS order (then any other section), secrets masked (left out when read
    from their *_file, which is shown), paths as text."""
    from pydantic import SecretStr  # the full install's; imported here so `sparc subscribe` stays light

    from streams.settings import SECRETS, SECTIONS, section_of

    out: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name in SECRETS and getattr(settings, f"{name}_file") is not None:
            value = None
        elif isinstance(value, SecretStr):
            value = MASK
        elif isinstance(value, Path):
            value = str(value)
        out.setdefault(section_of(name), {})[name] = value
    return {section: fields for section, fields in out.items() if fields}


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = ["# sparc-stream settings (sparc config show). Precedence: flags > SPARC_<FIELD> > this file > defaults."]
    for section, fields in sections.items():
        lines += ["", f"[{section}]"]
        for name, value in fields.items():
            lines.append(f"# {name} = (unset)" if value is None else f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def run_show(args: argparse.Namespace) -> int:
    sections = effective(build_settings(args.config))
    print(json.dumps(sections, indent=2) + "\n" if args.format == "json" else to_toml(sections), end="")
    return 0
