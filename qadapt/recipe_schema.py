"""The recipe's keys as data: each key's type, choices, default and doc, read from the recipe's dataclasses.

The docs site's recipe reference (tools/docs_reference.py) and the studio's recipe form
(qadapt.studio) are both drawn from `field_docs` and `recipe_keys`, so neither restates the schema.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def field_docs(cls: type) -> dict[str, str]:
    """The string written under each field of a dataclass (and of its bases), as the source has it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
                docs[statement.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


def default_of(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def type_of(hint: Any) -> dict:
    """A type as a form reads it: {"type": bool | int | float | str | list | choice | any, "choices",
    "items" (of a list), "nullable"}."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(hint) if a is not type(None)]
        nullable = type(None) in get_args(hint)
        if len(members) == 1:
            return {**type_of(members[0]), "nullable": nullable}
        described = [type_of(member) for member in members]
        if all(d["type"] in ("choice", "bool") for d in described):  # `true`, `false` or `auto`
            choices = [c for d in described for c in (d["choices"] if d["type"] == "choice" else [True, False])]
            return {"type": "choice", "choices": choices, "nullable": nullable}
        return {"type": "any", "nullable": nullable}  # a string or a list of them: YAML decides
    if origin is Literal:
        return {"type": "choice", "choices": list(get_args(hint)), "nullable": False}
    if origin is list:
        return {"type": "list", "items": type_of(get_args(hint)[0]), "nullable": False}
    name = {bool: "bool", int: "int", float: "float", str: "str"}.get(hint, "any")
    return {"type": name, "nullable": False}


def recipe_keys() -> list[dict]:
    """Every recipe key, in the recipe's order: {"key" (section.name), "section", "doc", "default", and
    type_of's fields}; an adapter key also has "kinds" (the adapter kinds it belongs to), and its default
    is that of the first kind that has it."""
    from qadapt.recipe import Recipe

    hints, docs = get_type_hints(Recipe), field_docs(Recipe)
    keys = []
    for f in fields(Recipe):
        if f.name == "adapter":
            keys += _adapter_keys()
        elif is_dataclass(hints[f.name]):
            section, section_docs = hints[f.name], field_docs(hints[f.name])
            section_hints = get_type_hints(section)
            keys += [{"key": f"{f.name}.{g.name}", "section": f.name, "doc": section_docs[g.name],
                      "default": default_of(g), **type_of(section_hints[g.name])} for g in fields(section)]
        else:
            keys.append({"key": f.name, "section": "", "doc": docs[f.name], "default": default_of(f),
                         **type_of(hints[f.name])})
    return keys


def _adapter_keys() -> list[dict]:
    """The adapter section's keys, one per name across the specs (the section is one spec per topology,
    picked by `kind`), each with the kinds that have it."""
    from qadapt.adapters.spec import SPECS, kinds_of
    from qadapt.recipe import Recipe

    keys: dict[str, dict] = {}
    for spec in SPECS:
        hints, docs, defaults = get_type_hints(spec), field_docs(spec), spec()
        for f in fields(spec):
            if f.name in keys:
                keys[f.name]["kinds"] += kinds_of(spec)
                continue
            keys[f.name] = {"key": f"adapter.{f.name}", "section": "adapter", "doc": docs[f.name],
                            "default": getattr(defaults, f.name), "kinds": list(kinds_of(spec)),
                            **type_of(hints[f.name])}
    kinds = [kind for spec in SPECS for kind in kinds_of(spec)]
    keys["kind"].update({"type": "choice", "choices": kinds, "default": Recipe().adapter.kind})
    return list(keys.values())
