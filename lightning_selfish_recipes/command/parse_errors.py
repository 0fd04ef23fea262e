"""jsonargparse's parsing errors said in the command's terms: the wrong type of a value, and the mistakes inside an
argument group (:data:`GROUPS`: ``--model.sparsity``, the arguments of ``SelfishSparsityCallback``), which
jsonargparse reports as a long failed ``Union``: a single value given to the group (``--model.sparsity 0.5``, its form
before it became a group), an argument it does not have (with the closest name), or a value of the wrong type for one
of its arguments. The messages are read as text: a jsonargparse that words them otherwise leaves them as they are
(tests/recipes/test_sparsity_group_errors.py notices)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re

__all__ = ["GROUPS", "Group", "group_error_message", "plain_type_error"]

_UNION = re.compile(
    r"^(?P<key>--\S+): Does not validate against any of the Union subtypes Subtypes: \[(?P<types>.*)\] "
    r"Errors: .* Given value type: .* Given value: (?P<value>.*)$"
)
_EXPECTED = re.compile(
    r"^(?P<key>--\S+): Expected a (?P<type><class '\w+'>|typing\.Literal\[.*\])\.? Got value: (?P<value>.*)$"
)
_TYPE_NAMES = {
    "float": "a number",
    "int": "a whole number",
    "bool": "true or false",
    "str": "a string",
    "NoneType": "null",
    "PositiveInt": "a positive whole number",
}


def _type_name(text: str) -> str:
    """``<class 'float'>`` -> "a number", ``typing.Literal['a', 'b']`` -> "one of 'a', 'b'"."""
    text = text.strip()
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return f"one of {literal.group(1)}"
    items = re.fullmatch(r"(?:[\w.]+\.)?(?:list|List|Sequence)\[(.*)\]", text)
    if items:
        inner = _type_name(items.group(1))
        return "a list of " + (inner[2:] + "s" if inner.startswith("a ") else inner)
    name = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>$", r"\1", text)
    return _TYPE_NAMES.get(name, name)


def plain_type_error(message: str) -> str:
    """jsonargparse's messages about a value of the wrong type in the form of the other errors:
    ``--model.clip: expected a number or null, got 'half'`` (a group's own arguments: :func:`group_error_message`)."""
    union = _UNION.match(message)
    if union:
        names = [_type_name(t) for t in _split_top_level(union.group("types"))]
        expected = " or ".join(dict.fromkeys(names))
        return f"{union.group('key')}: expected {expected}, got {union.group('value').strip()!r}"
    single = _EXPECTED.match(message)
    if single:
        return (
            f"{single.group('key')}: expected {_type_name(single.group('type'))}, got {single.group('value').strip()!r}"
        )
    return message


@dataclasses.dataclass(frozen=True)
class Group:
    """An argument group of the command, as its errors name it."""

    owner: str  #: whose arguments they are
    example: str  #: the argument a single value given to the group most likely meant
    null: str  #: what ``null`` for the whole group does


#: The command's argument groups (a dataclass of arguments, or null), by their key.
GROUPS: dict[str, Group] = {
    "model.sparsity": Group(owner="SelfishSparsityCallback", example="sparsity", null="trains dense"),
}

_GROUP_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":')
_CLASS_PATH = re.compile(r"Problem with given class_path '(?P<path>[\w.]+)':")
_UNKNOWN = re.compile(r"\s*Option '(?P<name>\w+)' is not accepted")
_INNER_KEY = re.compile(r'\s*Parser key "(?P<name>\w+)":')


def group_error_message(message: str) -> str | None:
    """jsonargparse's error for a value of a group in :data:`GROUPS`, in one short line; None for other errors.

    The message is a failed ``Union[<arguments dataclass>, None]``: either the group was given something that is
    not a mapping of its arguments (a single value), or one of its arguments is unknown or of the wrong type.
    """
    match = _GROUP_KEY.match(message)
    group = GROUPS.get(match["key"]) if match else None
    if match is None or group is None or "Does not validate against any of the Union subtypes" not in message:
        return None
    key = match["key"]
    inner = _CLASS_PATH.search(message)
    if inner is None:  # nothing of the group's own was tried: a single value, not a mapping of arguments
        value = _given_value(message.splitlines())
        if value is None:
            return None
        shown = value if _is_number(value) else f"<{group.example}>"
        return (
            f"--{key} is a group of {group.owner}'s arguments, not one value (got {_shown(value)}): "
            f"--{key}.{group.example} {shown} sets the {group.example}, --{key}.help lists the others, "
            f"--{key} null {group.null}"
        )
    detail = message[inner.end() :].split("\n", 1)[-1]  # the lines nested under the class path's
    unknown = _UNKNOWN.match(detail)
    if unknown is not None:
        name = unknown["name"]
        close = difflib.get_close_matches(name, _field_names(inner["path"]), n=1)
        guess = f"did you mean --{key}.{close[0]}? " if close else ""
        return f"--{key}.{name} is not an argument of {group.owner} ({guess}--{key}.help lists the arguments)"
    argument = _INNER_KEY.match(detail)
    if argument is None:
        return None
    block = _indented_block(detail.splitlines()[1:])
    value = _given_value(block)
    types = _expected_types(block)
    if value is None or not types:
        return None
    return (
        f"--{key}.{argument['name']}: expected {_alternatives(types)}, got {_shown(value)} "
        f"(--{key}.help lists the arguments)"
    )


def _indented_block(lines: list[str]) -> list[str]:
    """The first of ``lines`` and those after it indented at least as deep (the block nested under a header)."""
    if not lines:
        return []
    depth = len(lines[0]) - len(lines[0].lstrip())
    block = []
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) < depth:
            break
        block.append(line)
    return block


def _given_value(lines: list[str]) -> str | None:
    """The value jsonargparse says it was given (``Given value: x`` or ``Got value: x``), at the shallowest level."""
    for line in lines:
        found = re.search(r"(?:Given|Got) value: (.*)$", line)
        if found and "NestedArg(" not in found[1]:
            return found[1].strip()
    return None


def _shown(value: str) -> str:
    """A given value as the message shows it: numbers and lists as they are, words quoted."""
    return value if _is_number(value) or value[:1] in "[{" else repr(value)


def _expected_types(lines: list[str]) -> list[str]:
    text = "\n".join(lines)
    subtypes = re.search(r"Subtypes: \[(.*)\]", text)
    if subtypes is not None:
        return [_type_name(t) for t in _split_top_level(subtypes[1])]
    return [_type_name(t) for t in re.findall(r"Expected a (<class '[\w.]+'>)", text)]


def _split_top_level(text: str) -> list[str]:
    """``"a, b[c, d]"`` -> ``["a", "b[c, d]"]``: the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [part for part in parts if part]


def _alternatives(types: list[str]) -> str:
    return types[0] if len(types) == 1 else ", ".join(types[:-1]) + " or " + types[-1]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _field_names(class_path: str) -> list[str]:
    """The argument names of the group's dataclass (for a close match); none when it cannot be found."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return [field.name for field in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
