"""The bundle's command line: overrides checked against the config before anything runs (a
misspelt ``--key`` names the closest id), flags as typed on a command line (``true``, ``none``,
``[0.1, 0.03]``) turned into values, and input errors ended with their message instead of MONAI's
long "Failed to instantiate component" traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["check_cli_overrides", "as_flag", "exit_with_message"]

def _bundle_command_line() -> bool:
    """True under ``python -m monai.bundle ...`` (where an input error should end the run with its message)."""
    import sys

    return bool(sys.argv) and str(sys.argv[0]).replace("\\", "/").endswith("monai/bundle/__main__.py")


def exit_with_message(fn: Callable) -> Callable:
    """Under the bundle's command line, end a project input error with its message and exit status 1.

    MONAI wraps every exception raised while a config is evaluated in its own "Failed to
    instantiate component" / "Failed to evaluate ConfigExpression" error, so the project's message
    ended up in the middle of a long traceback. The bundle's entry points therefore turn the input
    errors (``ValueError``, ``OSError``, ``LookupError``, ``FloatingPointError``) into
    ``SystemExit("cidir_lung_ct: <type>: <message>")``: the user sees that message as the last
    lines, once. Called from Python, the functions raise as usual.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, LookupError, FloatingPointError) as e:
            if not _bundle_command_line():
                raise
            raise SystemExit(f"cidir_lung_ct: {type(e).__name__}: {e}") from None

    return wrapper


#: ``python -m monai.bundle run`` arguments that are not config ids
_RUN_ARGS = (
    "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
    "workflow_name", "workflow_type", "properties_path",
)  # fmt: skip


def _parse_cli_flags(args: Sequence[str]) -> dict[str, str | bool]:
    """``--key value`` / ``--key=value`` pairs of a Fire command line (a bare ``--key`` is ``True``)."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        token = str(args[i])
        i += 1
        if not token.startswith("--") or token == "--":
            continue
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i < len(args) and not str(args[i]).startswith("--"):
                value, i = str(args[i]), i + 1
            else:
                value = True  # type: ignore[assignment]
        out[key.replace("-", "_") if "#" not in key else key] = value
    return out


def _literal(value: str | bool) -> Any:
    """What Fire makes of a command-line value: a Python literal where it parses, else the string."""
    import ast

    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "null": None, "none": None}.get(value.lower(), value)


def _new_option_of_known_parent(parser, key: str) -> bool:
    """``a#b`` not in the config, where ``a`` is an options dict (passed on as keyword arguments) or a
    component whose ``_target_`` accepts ``b``: a legitimate new option. A target that takes its
    options as ``**keywords`` names them by a ``keyword_options`` group (e.g. ``CIDIRTrainer``'s
    :class:`~monai_cidir.engines.options.TrainingSettings`)."""
    import inspect
    from pydoc import locate

    parent, sep, leaf = key.rpartition("#")
    if not sep or parent not in parser:
        return False
    node = parser[parent]
    if not isinstance(node, dict):
        return False
    target = node.get("_target_")
    if target is None:
        return True  # a plain options dict, e.g. ``phantom``: its consumer checks the names
    fn = locate(target) if isinstance(target, str) else None
    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    if leaf in params:
        return True
    group = getattr(fn, "keyword_options", None)
    if group is not None:  # the target's **keywords are this group's options
        return leaf in group.names()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _sibling_ids(parser, key: str) -> list[str]:
    """The ids beside a nested ``a#b`` (the keys of ``a``, and the options of its target's
    ``keyword_options`` group), for the closest-match hint."""
    from pydoc import locate

    parent, sep, _ = key.rpartition("#")
    if not sep or parent not in parser or not isinstance(parser[parent], dict):
        return []
    node = parser[parent]
    names = [str(k) for k in node if not str(k).startswith("_")]
    target = locate(node["_target_"]) if isinstance(node.get("_target_"), str) else None
    group = getattr(target, "keyword_options", None)
    names += list(group.names()) if group is not None else []
    return [f"{parent}#{n}" for n in dict.fromkeys(names)]


@exit_with_message
def check_cli_overrides(argv: Sequence[str] | None = None) -> None:
    """Refuse command-line overrides that no config id reads, or whose value has the wrong type.

    Under ``python -m monai.bundle run <id> --config_file F --key value ...`` MONAI adds any
    ``--key`` to the config, so a misspelt one (``--max_iteration 50000``) would run the defaults
    with exit status 0. This reads the command line (``sys.argv``; nothing happens outside
    ``monai.bundle``'s entry point), loads the config files and checks that every override names
    an id of them (``a#b`` for nested ones) and that a number, boolean or list keeps its kind
    (``--max_iterations abc`` is refused). The bundle's configs call it first.

    Args:
        argv: the command line (default ``sys.argv``).

    Raises:
        ValueError: naming the key, the closest known ids, or the expected type and the value.
    """
    import difflib
    import sys

    from monai.bundle import ConfigParser

    if argv is None:
        if not _bundle_command_line():
            return
        argv = sys.argv
    argv = list(argv)
    flags = _parse_cli_flags(argv[1:])
    files = _literal(flags.get("config_file", ""))
    if not files or flags.get("args_file"):
        return  # overrides read from an args file are not on the command line
    parser = ConfigParser()
    parser.read_config(files if isinstance(files, (list, tuple)) else [str(f) for f in str(files).split(",")])
    known = [k for k in parser.get() if k not in ("imports",)]
    problems = []
    for key, raw in flags.items():
        if key in _RUN_ARGS:
            continue
        if key not in parser and _new_option_of_known_parent(parser, key):
            continue
        if key not in parser:
            close = difflib.get_close_matches(key, known + _sibling_ids(parser, key), n=3)
            hint = f"; closest: {', '.join('--' + c for c in close)}" if close else ""
            problems.append(f"--{key}: no config id '{key}' in {files}, so nothing would read it{hint}")
            continue
        default, value = parser[key], _literal(raw)
        if isinstance(default, str) and default.startswith(("$", "@", "%")):
            continue  # an expression: its type is known only when evaluated
        if key in _NULLABLE and (value is None or str(value).strip().lower() in ("none", "null")):
            continue  # documented: null switches it off
        expected = (bool,) if isinstance(default, bool) else (int,) if isinstance(default, int) else (int, float) if isinstance(default, float) else (list, tuple) if isinstance(default, list) else None
        if expected is not None and (not isinstance(value, expected) or (bool not in expected and isinstance(value, bool))):
            if isinstance(value, str) and value.startswith(("$", "@", "%")):
                continue
            problems.append(f"--{key} {raw}: expected {' or '.join(t.__name__ for t in expected)} like the default {default!r}, found {type(value).__name__}")
    if problems:
        raise ValueError("command-line override(s) refused before anything ran:\n  " + "\n  ".join(problems))


#: numeric options whose documented ``null`` switches them off (time-based checkpoints; the
#: regularizer's point subset, so that every point is regularised)
_NULLABLE = ("checkpoint_every_s", "regularization_points")

_FLAG_OPTIONS = ("overwrite", "resume", "no_folding", "export_images", "alpha_per_point", "affine_prealign", "progress")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def as_flag(value: Any, name: str = "value", allow: Sequence[str] = ()) -> Any:
    """A command-line flag as a bool: ``--overwrite true`` reaches the config as the string ``"true"``.

    Args:
        value: a bool, or a string such as ``"true"``/``"false"``/``"yes"``/``"no"``/``"1"``/``"0"``.
        name: the option's name, for the error message.
        allow: other strings passed through unchanged (e.g. ``"auto"``).

    Returns:
        ``True``/``False``, or ``value`` itself when it is one of ``allow``.

    Raises:
        ValueError: for any other value.

    Example::

        >>> as_flag("true"), as_flag(False), as_flag("auto", allow=("auto",))
        (True, False, 'auto')
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in allow:
            return v
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    expected = ", ".join(["true", "false", *allow])
    raise ValueError(f"--{name} expects one of {expected}; found {value!r}")


def _normalise_options(kwargs: dict) -> dict:
    out = dict(kwargs)
    for key in _FLAG_OPTIONS:
        if key in out:
            out[key] = as_flag(out[key], key, allow=("auto",) if key == "affine_prealign" else ())
    for key in ("alpha", "time_budget_s", *_NULLABLE):  # "null" / "none" as typed on a command line
        if isinstance(out.get(key), str) and out[key].strip().lower() in ("none", "null", ""):
            out[key] = None
    for key in ("alpha", "alpha_range"):  # "[0.1, 0.03]": one weight per regularizer, as a JSON list
        if isinstance(out.get(key), str) and out[key].strip().startswith("["):
            try:
                out[key] = json.loads(out[key])
            except ValueError:
                raise ValueError(f"--{key} expects a number or a JSON list such as [0.1, 0.03]; found {out[key]!r}") from None
    if "alpha_range" in out and out["alpha_range"] is None:
        del out["alpha_range"]  # the engines' default (or, in inference, the range stored in model.pt)
    if "alpha_range" in out:
        out["alpha_range"] = _alpha_range_option(out["alpha_range"])
    return out


def _alpha_range_option(value) -> list:
    """``[low, high]``, or one such pair per weight, as floats with ``low <= high``."""
    from monai_cidir.engines.alphas import weight_ranges

    try:
        pairs = weight_ranges(value)
    except (TypeError, ValueError):
        pairs = []
    if not pairs or any(not lo <= hi for lo, hi in pairs):
        raise ValueError(f"--alpha_range expects [low, high] with low <= high (or one such pair per weight); found {value!r}")
    nested = all(isinstance(v, (list, tuple)) for v in value)
    return [list(p) for p in pairs] if nested else list(pairs[0])
