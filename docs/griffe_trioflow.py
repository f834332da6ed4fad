"""A Griffe extension for the API reference: trioflow's signatures as Python sees them.

Griffe reads the source without running it, so two things trioflow relies on
would show wrong signatures in the reference, and make mkdocstrings warn about
docstrings that are right:

* attrs classes (``@attrs.frozen``, ``@attrs.define``) get their ``__init__``
  from their fields at run time; here it is built the same way from the
  annotated attributes (keyword-only with ``kw_only=True``, defaults from
  ``attrs.field(default=...)`` or ``factory=``, ``init=False`` left out, a
  leading underscore dropped from the parameter's name as attrs does);
* ``**options: Unpack[SomeTypedDict]`` (``App.consumer``,
  ``Flow.add_consumer``) is shown as the keyword-only parameters it stands
  for, which the docstrings document one by one;
* constants, type aliases and fields are documented by ``#:`` comments above
  them (``MAX_DEPTH``, ``StartFrom``), which Griffe does not read: they become
  the attributes' docstrings;
* a paragraph that introduces an indented example ends with ``::`` (as in
  ``Example::``), which Markdown would print: it is shown with one colon.

mkdocs.yml loads it (``extensions``); it is not part of the site.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import (
    Attribute,
    Class,
    Docstring,
    Expr,
    ExprCall,
    ExprKeyword,
    ExprSubscript,
    Extension,
    Function,
    Module,
    Object,
    Parameter,
    ParameterKind,
    Parameters,
)

_ATTRS_DECORATORS = {
    f"{package}.{name}"
    for package in ("attrs", "attr")
    for name in ("frozen", "define", "mutable", "s", "attrs", "dataclass")
}
_UNPACK = {"typing.Unpack", "typing_extensions.Unpack"}


def _keywords(call: ExprCall) -> dict[str, str | Expr]:
    return {arg.name: arg.value for arg in call.arguments if isinstance(arg, ExprKeyword)}


def _attrs_options(cls: Class) -> dict[str, str] | None:
    """The keyword arguments of the class's attrs decorator, or None if it has none."""
    for decorator in cls.decorators:
        value = decorator.value
        if isinstance(value, ExprCall) and value.canonical_path in _ATTRS_DECORATORS:
            return {name: str(arg) for name, arg in _keywords(value).items()}
        if isinstance(value, Expr) and value.canonical_path in _ATTRS_DECORATORS:
            return {}
    return None


def _field_options(attribute: Attribute) -> dict[str, str | Expr] | None:
    """The keyword arguments of the attribute's ``attrs.field(...)``, or None without one."""
    value = attribute.value
    if isinstance(value, ExprCall) and value.canonical_path in {"attrs.field", "attr.ib"}:
        return _keywords(value)
    return None


def _fields(cls: Class) -> list[Attribute]:
    """The class's attrs fields: its annotated attributes, not ClassVars or properties."""
    return [
        member
        for member in cls.members.values()
        if isinstance(member, Attribute)
        and member.annotation is not None
        and "property" not in member.labels
        and not ("class-attribute" in member.labels and "instance-attribute" not in member.labels)
    ]


def _attrs_parameters(cls: Class, *, kw_only: bool) -> list[Parameter]:
    # Fields whose default a method computes (``@size.default``).
    computed = {
        str(decorator.value).removesuffix(".default")
        for function in cls.functions.values()
        for decorator in function.decorators
        if str(decorator.value).endswith(".default")
    }
    parameters = []
    for member in _fields(cls):
        field = _field_options(member)
        if field is not None and str(field.get("init")) == "False":
            continue
        default: str | Expr | None
        if member.name in computed:
            default = "..."
        elif field is None:
            default = member.value
        elif "default" in field:
            default = field["default"]
        elif "factory" in field:
            default = f"{field['factory']}()"
        else:
            default = None
        kind = (
            ParameterKind.keyword_only
            if kw_only or (field is not None and str(field.get("kw_only")) == "True")
            else ParameterKind.positional_or_keyword
        )
        name = str(field["alias"]).strip("'\"") if field and "alias" in field else member.name
        parameters.append(
            Parameter(
                name.lstrip("_"),
                annotation=member.annotation,
                kind=kind,
                default=default,
                docstring=member.docstring,
            )
        )
    return parameters


def _set_attrs_init(cls: Class) -> None:
    options = _attrs_options(cls)
    if options is None or "__init__" in cls.members or options.get("init") == "False":
        return
    if all(field.name.startswith("_") for field in _fields(cls)):
        return  # only trioflow builds it (a Transaction): users never call its __init__
    init = Function("__init__", lineno=0, endlineno=0, parent=cls, returns="None")
    init.parameters = Parameters(
        Parameter("self", kind=ParameterKind.positional_or_keyword),
        *_attrs_parameters(cls, kw_only=options.get("kw_only") == "True"),
    )
    cls.set_member("__init__", init)


def _expand_unpacked(func: Function) -> None:
    """Show ``**options: Unpack[TD]`` as the keyword-only parameters of ``TD``."""
    for parameter in func.parameters:
        annotation = parameter.annotation
        if (
            parameter.kind is ParameterKind.var_keyword
            and isinstance(annotation, ExprSubscript)
            and annotation.canonical_path in _UNPACK
        ):
            break
    else:
        return
    if not isinstance(annotation.slice, Expr):
        return
    typed_dict = func.modules_collection[annotation.slice.canonical_path]
    expanded = [
        Parameter(
            name,
            annotation=attribute.annotation,
            kind=ParameterKind.keyword_only,
            default="...",
            docstring=attribute.docstring,
        )
        for name, attribute in typed_dict.attributes.items()
    ]
    kept = [p for p in func.parameters if p is not parameter]
    func.parameters = Parameters(*kept, *expanded)


def _comment_docstring(attribute: Attribute) -> None:
    """Make the ``#:`` comment lines right above an attribute its docstring."""
    if attribute.docstring is not None or not attribute.lineno:
        return
    lines = attribute.module.lines
    first = attribute.lineno - 1
    while first > 0 and lines[first - 1].strip().startswith("#:"):
        first -= 1
    comment = [
        line.strip().removeprefix("#:").strip() for line in lines[first : attribute.lineno - 1]
    ]
    if comment:
        attribute.docstring = Docstring("\n".join(comment), lineno=first + 1, parent=attribute)


def _walk(obj: Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = re.sub(r"(?m)(\S)::$", r"\1:", obj.docstring.value)
    for member in obj.members.values():
        if member.is_alias:
            continue
        if isinstance(member, Attribute):
            _comment_docstring(member)
            _walk(member)
        elif isinstance(member, Class):
            _walk(member)  # its fields' docstrings first: the __init__ parameters take them
            _set_attrs_init(member)
        elif isinstance(member, Function):
            _walk(member)
            _expand_unpacked(member)
            for overload in member.overloads or ():
                _expand_unpacked(overload)
        elif isinstance(member, Module):
            _walk(member)


class TrioflowSignatures(Extension):
    """attrs classes' ``__init__``, ``**options: Unpack[...]`` expanded, ``#:`` comments."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        # Once the whole package is loaded: a TypedDict may live in another module.
        _walk(pkg)
