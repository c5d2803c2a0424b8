"""Command-line options generated from the Recipe: every field of the sections a command takes
becomes an option named `--<field-name>` (or its name in `recipe.CLI_NAMES`) with the field's
description as help, so a field added to the Recipe is a flag with no further code. Options carry
strings; pydantic validates and converts them once, exactly as it does a recipe file or an API
body, and its errors come back naming the flag."""

from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from llm_prune.errors import UserError
from llm_prune.recipe import CLI_NAMES, MAX_DEPTH, Recipe

ALL = tuple(Recipe.model_fields)  # every section and top-level field, including ones added later


@dataclass(frozen=True)
class Flag:
    path: tuple[str, ...]  # ("recovery", "max_steps")
    name: str  # "--max-steps"
    field: FieldInfo
    aliases: tuple[str, ...] = ()
    prefix: str = "recipe"

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def param(self) -> str:  # the Python parameter typer passes the value in
        return f"{self.prefix}__" + "__".join(self.path)

    @property
    def kind(self) -> str:
        ann = _strip_optional(self.field.annotation)
        if ann is bool:
            return "bool"
        origin = typing.get_origin(ann)
        if origin is list:
            return "list"
        if origin is dict or ann is dict:
            return "json"
        return "value"

    def option(self) -> inspect.Parameter:
        if self.kind == "bool":
            decls = [_switch(n) for n in (self.name, *self.aliases)]
            annotation: Any = Optional[bool]
        else:
            decls = [self.name, *self.aliases]
            annotation = Optional[str]
        env = f"LLM_PRUNE_{self.path[0].upper()}" if self.prefix == "settings" else None
        info = typer.Option(None, *decls, help=self.help() + (f" (env {env})" if env else ""),
                            metavar=self.metavar(), show_default=False,
                            rich_help_panel=self.path[0].capitalize() if len(self.path) > 1 else None)
        return inspect.Parameter(self.param, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)

    def help(self) -> str:
        text = self.field.description or ""
        default = self.field.default
        if self.kind != "bool" and default not in (None, PydanticUndefined) and not isinstance(default, (list, dict)):
            text += f" (default: {default})"
        elif self.kind == "bool" and default is not PydanticUndefined:
            text += f" (default: {'on' if default else 'off'})"
        return text

    def metavar(self) -> str | None:
        ann = _strip_optional(self.field.annotation)
        if typing.get_origin(ann) is typing.Literal:
            return "|".join(str(a) for a in typing.get_args(ann))
        if self.kind == "list":
            return "A,B,..."
        if self.kind == "json":
            return "JSON"
        return {int: "INT", float: "FLOAT", str: "TEXT"}.get(ann)

    def value(self, raw: Any) -> Any:
        """The flag's value as recipe data (pydantic converts and checks it later)."""
        if self.kind == "list":
            return [part.strip() for part in str(raw).split(",") if part.strip()]
        if self.kind == "json":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise UserError(f"{self.name}: not valid JSON: {exc.msg}", param=self.dotted) from None
            except RecursionError:  # nested past Python's parser; the recipe refuses far less (MAX_DEPTH)
                raise UserError(f"{self.name}: nested deeper than {MAX_DEPTH} levels", param=self.dotted) from None
            return value
        return raw


def _switch(name: str) -> str:
    """`--x/--no-x`; a field that is itself a negation (`no_auth`) switches back with `--auth`."""
    stem = name[2:]
    return f"--{stem}/--{stem[3:]}" if stem.startswith("no-") else f"--{stem}/--no-{stem}"


def _strip_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    ann = _strip_optional(field.annotation)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def recipe_flags(include: tuple[str, ...] = ALL, *, exclude: tuple[str, ...] = (),
                 names: dict[str, str] | None = None) -> list[Flag]:
    """Flags for the Recipe fields named in `include` (a section, a top-level field, or a dotted
    field), minus `exclude`. `names` gives a field the name a command has always used for it (the
    general name stays as an alias). Two fields that would share a flag in one command are a
    programming error, reported at once."""
    names = names or {}
    flags: list[Flag] = []

    def wanted(path: tuple[str, ...]) -> bool:
        dotted = ".".join(path)
        hit = lambda names: any(dotted == n or dotted.startswith(n + ".") for n in names)  # noqa: E731
        return hit(include) and not hit(exclude)

    for name, field in Recipe.model_fields.items():
        section = _section_model(field)
        members = section.model_fields.items() if section else [(None, field)]
        for sub, f in members:
            path = (name, sub) if sub else (name,)
            if not wanted(path):
                continue
            dotted = ".".join(path)
            general = CLI_NAMES.get(dotted, "--" + path[-1].replace("_", "-"))
            primary = names.get(dotted, general)
            flags.append(Flag(path, primary, f, (general,) if primary != general else ()))
    _check_unique(flags)
    return flags


def settings_flags(model: type[BaseModel], *, include: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                   names: dict[str, str] | None = None) -> list[Flag]:
    """Flags for a flat settings model (every field, or `include`), named `--<field-name>` unless
    `names` says otherwise (the general name stays as an alias)."""
    names = names or {}
    flags = []
    for name, field in model.model_fields.items():
        if (include is not None and name not in include) or name in exclude:
            continue
        general = "--" + name.replace("_", "-")
        primary = names.get(name, general)
        flags.append(Flag((name,), primary, field, (general,) if primary != general else (), prefix="settings"))
    _check_unique(flags)
    return flags


def _check_unique(flags: list[Flag]) -> None:
    seen: dict[str, str] = {}
    for flag in flags:
        for n in (flag.name, *flag.aliases):
            if n in seen:
                raise RuntimeError(f"{flag.dotted} and {seen[n]} would both be {n}: name one in recipe.CLI_NAMES")
            seen[n] = flag.dotted


def flags_to_data(flags: list[Flag], values: dict[str, Any]) -> dict[str, Any]:
    """Only the flags a user gave (not None), nested in their sections."""
    out: dict[str, Any] = {}
    for flag in flags:
        raw = values.get(flag.param)
        if raw is None:
            continue
        node = out
        for part in flag.path[:-1]:
            node = node.setdefault(part, {})
        node[flag.path[-1]] = flag.value(raw)
    return out


def flag_for(flags: list[Flag], dotted: str | None) -> str | None:
    for flag in flags:
        if flag.dotted == dotted:
            return flag.name
    return None


def with_recipe_flags(flags: list[Flag], into: str = "recipe_data") -> Callable:
    """Decorate a typer command whose last parameter is `recipe_data: dict` (or `into`): the
    generated options are added to its signature, and it receives the given ones as nested data."""
    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != into]
        hints = typing.get_type_hints(fn)
        hints.pop(into, None)

        @functools.wraps(fn)
        def command(**kwargs):
            values = {f.param: kwargs.pop(f.param, None) for f in flags}
            return fn(**kwargs, **{into: flags_to_data(flags, values)})

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == p.POSITIONAL_OR_KEYWORD else p
                  for p in own] + [f.option() for f in flags]
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {**hints, **{f.param: f.option().annotation for f in flags}}
        return command

    return decorate


_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}


def recipe_from_data(data: dict[str, Any], flags: list[Flag], model: type[BaseModel] = Recipe,
                     prefix: tuple[str, ...] = ()) -> Any:
    """Validate merged recipe data (or one section of it, at `prefix`); an error about a field
    names its flag."""
    from pydantic import ValidationError

    from llm_prune.recipe import format_validation_error

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        message, param = format_validation_error(exc)
        param = ".".join([*prefix, param]) if param else (".".join(prefix) or None)
        flag = flag_for(flags, param)
        bound = _BOUNDS.get(err.get("type"))
        if flag is not None and bound is not None:
            message = f"{flag} must be {bound[0]} {err['ctx'][bound[1]]}, got {err.get('input')}"
        elif flag is not None:
            message = f"{flag}: {message.split(': ', 1)[-1]}"
        elif param == "budget":
            budget = data.get("budget") if isinstance(data, dict) else None
            both = isinstance(budget, dict) and all(budget.get(k) is not None for k in ("ratio", "target_params"))
            message = ("give --ratio or --target-params, not both" if both else
                       "give --ratio or --target-params (or `budget` in the recipe)")
        else:
            message = f"invalid recipe: {message}"
        raise UserError(message, param=param) from None
