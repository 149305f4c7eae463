"""The config reference, generated from the models themselves so it cannot drift from them:
`lmeye config reference` prints it as Markdown (the README's copy comes from there)."""

from __future__ import annotations

import json
import typing
from typing import Any, Iterator

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Config models nested in a field's type (a section, or the items of a list of sources)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _kind(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    return typing.get_args(field.annotation)[0] if field is not None else None


def _type_name(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _type_name(args[0])  # Optional[X]: null is shown as the default
    models = _models_in(annotation)
    if models and origin is list:
        return "list of " + (", ".join(f"kind={_kind(m)}" for m in models) if _kind(models[0]) else models[0].__name__)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json", exclude_defaults=True) | {"kind": _kind(type(v))} for v in value]
    return json.dumps(value, default=str)


def rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        if nested and len(nested) == 1 and not typing.get_args(field.annotation):
            yield from rows(nested[0], key + ".")
            continue
        yield key, _type_name(field.annotation), _default(field), field.description or ""
        if nested:  # a list of tagged sub-configs: one block per kind
            for sub in nested:
                tag = f"[kind={_kind(sub)}]" if _kind(sub) else "[]"
                yield from rows(sub, f"{key}{tag}.")


def markdown(model: type[BaseModel]) -> str:
    out = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_name, default, doc in rows(model):
        out.append(f"| `{key}` | {type_name} | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(out)
