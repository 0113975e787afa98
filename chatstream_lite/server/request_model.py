"""Request bodies as pydantic models: shapes and ranges declared, errors as our 400s.

    class Body(RequestModel):
        temperature: float | None = Field(None, ge=0, le=2)
    body = validate(Body, data)        # BadRequest("'temperature' must be a number from 0
                                       # to 2.", param="temperature") on a bad value

Strict (no "1" for 1, no true for 1, no 1.5 for an int), frozen, unknown fields left to the
endpoint (`extra="ignore"`: `/chat_stream` ignores them, the OpenAI routes refuse them
before validating). A `ValidationError` becomes a `BadRequest` naming the first field at
fault as OpenAI names a parameter (`messages[0].role`, `logit_bias.5`), with a sentence built
from the field's declared type and bounds, so a client reads what a valid value is.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from ..config import SEED_LIMIT, option_of
from ..engine import SamplingParams
from ..errors import BadRequest

__all__ = ["RequestModel", "SamplingFields", "param_of", "validate"]

M = TypeVar("M", bound="RequestModel")


class RequestModel(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore",
                              hide_input_in_errors=True)


def validate(cls: type[M], data: dict[str, Any], context: dict[str, Any] | None = None,
             where: tuple[int | str, ...] = ()) -> M:
    """`data` as a `cls`; `BadRequest` naming the first field at fault (below `where`, for a
    part of a body validated on its own: `("stream_options",)`)."""
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as error:
        raise _bad_request(cls, error, where) from None


def param_of(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as OpenAI names a parameter: ("messages", 0, "role") ->
    "messages[0].role"; a dictionary's key is a dotted name ("logit_bias.5")."""
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else part)
    return param


def _bad_request(cls: type[RequestModel], error: ValidationError,
                 where: tuple[int | str, ...] = ()) -> BadRequest:
    first = error.errors(include_url=False)[0]
    loc = tuple(part for part in first["loc"] if not _is_union_branch(part))
    param = param_of((*where, *loc))
    if first["type"] == "value_error":    # a validator's own sentence
        message = str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
        return BadRequest(message, param=param or None)
    field = _field_at(cls, loc)
    return BadRequest(_sentence(param, first["type"], field), param=param or None)


def _is_union_branch(part: int | str) -> bool:
    """pydantic names the branch of a union it tried ("str", "list[TextPart]"): not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list")
                                      or "[" in part or part.startswith("function-"))


def _field_at(cls: type[RequestModel], loc: tuple[int | str, ...]) -> FieldInfo | None:
    """The declared field at `loc`, following nested models (None where it is not one)."""
    model: Any = cls
    field: FieldInfo | None = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return field if part == loc[-1] and field is not None else None
        field = fields[part]
        model = _model_in(field.annotation)
    return field


def _model_in(annotation: Any) -> Any:
    """The pydantic model a field holds (directly, in a list, or beside None), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _sentence(param: str, kind: str, field: FieldInfo | None) -> str:
    if kind == "missing":
        return f"'{param}' is required."
    if kind.startswith("bool"):
        return f"'{param}' must be true or false."
    low, high = _bounds(field)
    span = f" from {_shown(low)} to {_shown(high)}" if low is not None and high is not None \
        else (f" of at least {_shown(low)}" if low is not None else "")
    if kind.startswith("int") or (kind in _RANGE_ERRORS and _holds(field, int)):
        return f"'{param}' must be an integer{span}."
    if kind.startswith("float") or kind in _RANGE_ERRORS:
        return f"'{param}' must be a number{span}."
    if kind.startswith("string") or kind == "string_type":
        return f"'{param}' must be a string{_length(field)}."
    if kind.startswith(("list", "too_short", "too_long")):
        return f"'{param}' must be a list{_length(field)}."
    if kind.startswith(("dict", "model")):
        return f"'{param}' must be an object."
    if kind == "literal_error" and field is not None:
        choices = ", ".join(str(c) for c in get_args(field.annotation) if c is not None)
        return f"'{param}' must be one of {choices}."
    return f"'{param}' is not valid here."


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                 "finite_number"}


def _bounds(field: FieldInfo | None) -> tuple[float | None, float | None]:
    low = high = None
    for item in field.metadata if field is not None else ():
        low = getattr(item, "ge", None) if getattr(item, "ge", None) is not None else low
        high = getattr(item, "le", None) if getattr(item, "le", None) is not None else high
    return low, high


def _length(field: FieldInfo | None) -> str:
    low = high = None
    for item in field.metadata if field is not None else ():
        low = getattr(item, "min_length", None) or low
        high = getattr(item, "max_length", None) or high
    if low and high:
        return f" of {low} to {high} items" if field is not None and _holds(field, list) \
            else f" of {low} to {high} characters"
    return " that is not empty" if low else ""


def _holds(field: FieldInfo | None, kind: type) -> bool:
    annotation = field.annotation if field is not None else None
    return annotation is kind or kind in get_args(annotation) or \
        any(getattr(arg, "__origin__", None) is kind for arg in get_args(annotation)) or \
        getattr(annotation, "__origin__", None) is kind


def _shown(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def _range(name: str) -> tuple[float | None, float | None]:
    opt = option_of(name)
    return opt.minimum, opt.maximum


class SamplingFields(RequestModel):
    """What a request may set of its sampling, in the ranges of the server's own settings
    (config.py), with OpenAI's range for its two penalties."""

    temperature: float | None = Field(None, ge=_range("temperature")[0],
                                      le=_range("temperature")[1])
    top_p: float | None = Field(None, ge=_range("top_p")[0], le=_range("top_p")[1])
    top_k: int | None = Field(None, ge=_range("top_k")[0], le=_range("top_k")[1])
    repeat_penalty: float | None = Field(None, ge=_range("repeat_penalty")[0],
                                         le=_range("repeat_penalty")[1])
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=SEED_LIMIT - 1)

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        """`defaults` with what this request set."""
        changes: dict[str, Any] = {name: value for name in SamplingFields.model_fields
                                   if (value := getattr(self, name)) is not None}
        return replace(defaults, **changes)
