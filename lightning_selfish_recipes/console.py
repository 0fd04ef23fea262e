"""What the ``selfish-rnn`` command prints: one-line user errors, plain-text help, no dependency noise.

**User errors.** A mistake in arguments, a config or the data ends in one ``error: <message>`` line on stderr and
exit status 2, without a traceback; everything else is a bug and keeps its traceback (``--debug`` shows the
traceback of user errors too). These are user errors:

* a command-line or config parsing error (``argparse.ArgumentError``, which jsonargparse raises). A mistake inside
  an argument group (:data:`GROUPS`: ``--model.sparsity``, the arguments of ``SelfishSparsityCallback``), which
  jsonargparse reports as a long failed ``Union``, is said in the group's terms: a single value given to the group
  (``--model.sparsity 0.5``, its form before it became a group), an argument it does not have (with the closest
  name), or a value of the wrong type for one of its arguments;
* ``FileNotFoundError``, wherever it is raised (a corpus, a config, a checkpoint that is not there), and the
  corpus errors of :mod:`lightning_selfish_recipes.data` (a file whose checksum does not match);
* Lightning's ``MisconfigurationException`` (e.g. an accelerator that is not available);
* ``ValueError`` and ``TypeError`` raised *deliberately*, by a ``raise`` statement, in the argument checks of this
  project (``lightning_selfish_recipes``, ``lightning_selfish``), of Lightning or of jsonargparse. The same types raised
  anywhere else (inside torch, or by an operation that failed in our own code, such as an unpacking) are treated as
  bugs.

**Noise.** Lightning prints lines a user of this command cannot act on; they are filtered by message *and*
emitting module or logger, never by category alone, so anything else Lightning says still shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.util
import linecache
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import DefaultHelpFormatter

__all__ = [
    "GROUPS",
    "NOISE_LOG_MESSAGES",
    "NOISE_WARNINGS",
    "PlainTextHelpFormatter",
    "expect_checkpoints_in_log_dir",
    "plain_text",
    "quiet_dependency_noise",
    "user_error_message",
]

_PACKAGES = (
    "lightning_selfish_recipes",
    "lightning_selfish",
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "jsonargparse",
)
_MAX_MESSAGE = 600

# ------------------------------------------------------------------------------------------------- user errors


def user_error_message(
    error: BaseException,
    argv: Sequence[str] = (),
    commands: Sequence[str] | None = None,
    example_config: str | None = None,
) -> str | None:
    """One line that states the user error ``error``, or None when ``error`` is a bug (see the module docstring).

    A parsing error ends with the help command of the subcommand in ``argv`` when it is one of ``commands``;
    required arguments missing from an ``argv`` without ``--config`` say to start from ``example_config``.
    """
    kind = {cls.__name__ for cls in type(error).__mro__}
    if isinstance(error, argparse.ArgumentError):  # what jsonargparse raises (exit_on_error=False)
        group_message = group_error_message(str(error))
        if group_message is not None:
            return _shorten(group_message)
        message = _one_line(str(error))
        message = re.sub(r'^Parser key "([^"]+)":', r"--\1:", message)
        message = _plain_type_error(message)
        subcommand = next((a for a in argv if not a.startswith("-")), None)
        known = subcommand is not None and (commands is None or subcommand in commands)
        required = _REQUIRED.match(message)
        if required is not None:
            keys = [key.strip() for key in required["keys"].split(",")]
            keys = [f"--{key.removeprefix(f'{subcommand}.') if subcommand else key}" for key in keys]
            message = f"{required['start']}{', '.join(keys)}"
            if known and example_config is not None and not _gives_config(argv):
                return _shorten(
                    f"{message}; no --config was given: start from a recipe, e.g. selfish-rnn {subcommand} --config "
                    f"{example_config} (selfish-rnn list shows them all; selfish-rnn {subcommand} --help lists the "
                    "arguments)"
                )
        hint = f" (selfish-rnn {subcommand} --help lists the arguments)" if known else ""
        return _shorten(message) + hint
    if isinstance(error, FileNotFoundError) or "CorpusError" in kind or "MisconfigurationException" in kind:
        return _shorten(_one_line(str(error)))
    if isinstance(error, (ValueError, TypeError)) and _raised_deliberately(error):
        return _shorten(_one_line(str(error)))
    return None


_REQUIRED = re.compile(r"^(?P<start>the following arguments are required: )(?P<keys>.*)$")


def _gives_config(argv: Sequence[str]) -> bool:
    return any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)


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


def _plain_type_error(message: str) -> str:
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


def _raised_deliberately(error: BaseException) -> bool:
    """Whether the innermost frame of ``error`` is a ``raise`` statement in one of the trusted packages."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not any(Path(filename).is_relative_to(root) for root in _package_dirs(_PACKAGES)):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def _package_dirs(packages: Sequence[str]) -> list[Path]:
    """The directories of the installed ``packages`` (found without importing them)."""
    dirs = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(Path(location) for location in spec.submodule_search_locations)
    return dirs


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


# --------------------------------------------------------------------------------------------------------- help


_ROLES = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def plain_text(text: str) -> str:
    """Docstring text without reStructuredText markup: ````x```` -> ``x``, ``:class:`~a.B``` -> ``B``."""
    text = _ROLES.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).find("~") >= 0 else m.group(1), text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"(?<![\w`])`([^`]+)`(?!`)", r"\1", text)


_KNOWN_SUBCLASSES = re.compile(r"known subclasses: ([^)]*)\)")
_MAX_SUBCLASSES = 8


def _fewer_subclasses(text: str) -> str:
    """A long list of known subclasses (every torch.nn.Module for the network) cut to this project's own."""

    def cut(match: re.Match[str]) -> str:
        names = [name.strip() for name in match.group(1).split(",") if name.strip()]
        if len(names) <= _MAX_SUBCLASSES:
            return match.group(0)
        ours = [name for name in names if name.startswith(("lightning_selfish_recipes.", "lightning_selfish."))]
        return f"known subclasses: {', '.join(ours)} and {len(names) - len(ours)} others)"

    return _KNOWN_SUBCLASSES.sub(cut, text)


class PlainTextHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with the reStructuredText of the docstrings it shows turned into plain text, and long
    lists of known subclasses cut to this project's classes."""

    def _expand_help(self, action):  # type: ignore[no-untyped-def]
        return _fewer_subclasses(plain_text(super()._expand_help(action)))

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))


# -------------------------------------------------------------------------------------------------------- noise

NOISE_LOG_MESSAGES: tuple[str, ...] = (
    "💡 Tip: For seamless cloud",  # advertising for litlogger / litmodels, on every run
    # The command's own model summary (lightning_selfish_recipes.model_summary) replaces Lightning's default,
    # which Lightning says.
    "Trainer already configured with model summary callbacks",
)
"""Start of the INFO lines of Lightning's rank-zero logger that are dropped."""

_RANK_ZERO_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
_LIGHTNING_MODULE = r"(pytorch_lightning|lightning\.pytorch)\."

#: (message regex, category, emitting module regex) of the warnings that are ignored.
NOISE_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning's own pytree helper still builds torch's deprecated LeafSpec (torch >= 2.10); nothing to act on.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, _LIGHTNING_MODULE + r"utilities\._pytree"),
    # The recipes' loaders use no worker processes on purpose: the data is an in-memory tensor (docs/data.md).
    (r"The '\w+' does not have many workers", Warning, _LIGHTNING_MODULE),
)


def expect_checkpoints_in_log_dir() -> None:
    """A run that continues its own log version finds its checkpoints there: Lightning's warning that the
    checkpoint directory is not empty says nothing then (installed only for such runs)."""
    warnings.filterwarnings(
        "ignore", message=r"Checkpoint directory .* exists and is not empty", module=_LIGHTNING_MODULE
    )


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_dependency_noise() -> None:
    """Drop the dependency messages listed in :data:`NOISE_LOG_MESSAGES` and :data:`NOISE_WARNINGS`.

    For the ``selfish-rnn`` process only (the library never changes warning filters or logging).
    """
    for message, category, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(NOISE_LOG_MESSAGES))


def positive_int(text: str) -> int:
    """An ``argparse`` type for the tools' options: a whole number >= 1, or a clear error naming what was given."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value
