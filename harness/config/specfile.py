"""A YAML file read safely, with line numbers, within stated bounds; fields checked one by one.

Bounds (checked on the event stream and the node graph *before* anything is expanded, so a hostile
file is refused in milliseconds with one line): at most MAX_BYTES bytes, MAX_DEPTH levels of
nesting, and MAX_NODES values once aliases are expanded (`&anchor` / `*alias` reuse is allowed,
a "billion laughs" is not). Errors are HarnessError "FILE:LINE: KEY: problem. Fix: ...".
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessError

MAX_BYTES = 64 << 10     # 64 KiB: the largest spec in sweeps/ is a few KB
MAX_DEPTH = 16           # the schema nests three levels deep
_TOO_DEEP = (f"nesting deeper than {MAX_DEPTH} levels. Fix: a sweep spec nests three levels at most; "
             "flatten the file.")
MAX_NODES = 10_000       # values after alias expansion (the largest spec in sweeps/ has ~200)

class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when present: 10x faster
    """SafeLoader that reads 1e-4 as a float, like YAML 1.2 and JSON do."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


class Where:
    """Maps key paths to 1-based line numbers; formats errors."""

    def __init__(self, file: str):
        self.file = file
        self.lines: dict[tuple, int] = {}
        self.overrides: dict[tuple, str] = {}  # key path -> the command-line override that set it

    def line(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def location(self, path: tuple) -> str:
        """"FILE:LINE", or "FILE: override 'KEY=VALUE'" where a command-line override set the value."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.overrides:
                return f"{self.file}: override '{self.overrides[path[:n]]}'"
        line = self.line(path)
        return f"{self.file}:{line}" if line else self.file

    def error(self, path: tuple, problem: str, fix: str) -> HarnessError:
        loc = self.location(path)
        key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")
        end = "" if fix.endswith((".", "?", "!")) else "."
        return HarnessError(f"{loc}: {key or '(top level)'}: {problem}. Fix: {fix}{end}")


def _walk(node: yaml.Node, path: tuple, where: Where) -> None:
    where.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                where.lines[path + (key,)] = line
                raise where.error(path + (key,), f"duplicate key (first on line {seen[key]})",
                                  "keep one of the two entries")
            seen[key] = line
            where.lines[path + (key,)] = line
            _walk(value_node, path + (key,), where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where.lines[path + (i,)] = item.start_mark.line + 1
            _walk(item, path + (i,), where)


def _check_depth(text: str, path: Path) -> None:
    """Refuse nesting deeper than MAX_DEPTH, from the parser's events (the composer would recurse)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise HarnessError(f"{path}:{event.start_mark.line + 1}: {_TOO_DEEP}")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _expanded_size(node: yaml.Node, path: Path, memo: dict[int, int]) -> int:
    """The number of values `node` stands for once its aliases are expanded, counted on the node
    graph (an alias is the same node object, counted once per use but visited once)."""
    key = id(node)
    if key in memo:
        if memo[key] < 0:
            raise HarnessError(f"{path}:{node.start_mark.line + 1}: an alias refers to the collection that "
                               "contains it (a cycle). Fix: write the values out instead of the alias.")
        return memo[key]
    memo[key] = -1
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, path, memo) + _expanded_size(v, path, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, path, memo) for v in node.value)
    else:
        size = 1
    memo[key] = size
    return size


def read_yaml(path: Path, where: Where) -> Any:
    """The YAML document at `path`, within MAX_BYTES, MAX_DEPTH and MAX_NODES; line numbers of
    every key path recorded in `where`."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise HarnessError(f"{path}: {size:,} bytes, over the {MAX_BYTES:,}-byte limit of a sweep spec. "
                               "Fix: pass the sweep spec itself (a few KB), not a data file.")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HarnessError(f"{path}: no such sweep spec. Fix: check the path (specs live in sweeps/).")
    except (OSError, UnicodeDecodeError) as err:
        raise HarnessError(f"{path}: cannot read the file ({err}). Fix: pass a UTF-8 YAML file.")
    loader = _Loader(text)
    try:
        _check_depth(text, path)
        node = loader.get_single_node()
        if node is None:
            raise HarnessError(f"{path}: the file is empty. Fix: write a sweep spec "
                               "(at least `models: [DiT-S/2]`; see sweeps/smoke.yaml).")
        values = _expanded_size(node, path, {})
        if values > MAX_NODES:
            raise HarnessError(f"{path}: {values:,} values (aliases *name expanded), over the limit of a sweep "
                               f"spec, {MAX_NODES:,}. Fix: shorten the lists, or reuse fewer anchors.")
        _walk(node, (), where)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        if "nesting depth" in str(err.problem):  # libyaml's own limit (1000 levels) came first
            raise HarnessError(f"{path}{line}: {_TOO_DEEP}")
        raise HarnessError(f"{path}{line}: not valid YAML ({err.problem}). "
                           "Fix: check indentation, colons and quotes on that line.")
    except yaml.YAMLError as err:
        raise HarnessError(f"{path}: not valid YAML ({err}). Fix: check the file's syntax.")
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- overrides
MAX_OVERRIDE = 4096  # characters in one KEY=VALUE (a list of steps is a few hundred)


def apply_overrides(raw: dict, overrides: list[str], where: Where) -> dict:
    """Set each "dotted.key=value" of the command line into the parsed spec `raw` (in place; the value is
    read as YAML, so 2e-4, [1000, 2000] and null mean what they mean in the file). Each key path is
    remembered in `where`, so validation errors name the override instead of a line of the file."""
    for text in overrides:
        key, eq, value_text = text.partition("=")
        keys = key.strip().split(".")
        if not eq or not all(k.strip() for k in keys) or len(text) > MAX_OVERRIDE:
            raise HarnessError(f"override {text[:80]!r}: expected KEY=VALUE with a dotted key of at most "
                               f"{MAX_OVERRIDE} characters. Fix: write e.g. train.lr=2e-4 or eval.at_steps=[1000,2000].")
        keys = [k.strip() for k in keys]
        try:
            value = yaml.load(value_text, Loader=_Loader) if value_text.strip() else None
        except yaml.YAMLError as err:
            raise HarnessError(f"override {text!r}: the value is not valid YAML "
                               f"({getattr(err, 'problem', err)}). Fix: quote it, e.g. {key}='...'.") from None
        node = raw
        for depth, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise HarnessError(f"override {text!r}: {'.'.join(keys[:depth + 1])} is {typename(child)}, "
                                   f"not a section with keys. Fix: set {'.'.join(keys[:depth + 1])}=VALUE itself.")
            node = child
        node[keys[-1]] = value
        where.overrides[tuple(keys)] = text
    return raw


# --------------------------------------------------------------------------- validation
def typename(v: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


def check_keys(d: dict, allowed: list[str], path: tuple, where: Where) -> None:
    for key in d:
        if not isinstance(key, str):
            raise where.error(path + (key,), f"keys must be strings, got {typename(key)} {key!r}",
                              f"use one of: {', '.join(allowed)}")
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
            raise where.error(path + (key,), "unknown key", hint if close else f"remove it ({hint})")


def _scalar(value: Any, kind: Any, meta: dict, path: tuple, where: Where) -> Any:
    example = meta.get("example")
    if kind is bool:
        if not isinstance(value, bool):
            raise where.error(path, f"expected true or false, got {typename(value)} {value!r}", "write true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise where.error(path, f"expected an integer, got {typename(value)} {value!r}",
                                  "write a whole number such as 400000" if example is None else example)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(path, f"expected a number, got {typename(value)} {value!r}",
                              "write a number such as 1.0e-4")
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise where.error(path, f"expected a string, got {typename(value)} {value!r}", "quote the value")
        if "choices" in meta and value not in meta["choices"]:
            close = difflib.get_close_matches(value, meta["choices"], n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise where.error(path, f"unknown value {value!r}", f"{hint}use one of: {', '.join(meta['choices'])}")
    if kind in (int, float):
        return _in_range(value, meta, path, where)
    return value


def _num(v: float) -> str:
    """A number as a person reads it: 10,000,000; 1e+26; 0.5."""
    return f"{v:,}" if isinstance(v, int) and abs(v) < 10**15 else f"{v:.6g}"


def _in_range(value: Any, meta: dict, path: tuple, where: Where) -> Any:
    """`value` if finite and within the field's min/gt/lt/max, else the error naming the range and why."""
    hi, why = meta.get("max"), f" ({meta['why']})" if meta.get("why") else ""
    if not math.isfinite(value):
        lo, top = meta.get("min", meta.get("gt")), meta.get("max", meta.get("lt"))
        span = f"between {_num(lo)} and {_num(top)}" if None not in (lo, top) else "that is finite"
        raise where.error(path, f"{value} is not a finite number", f"write a number {span}{why}")
    if "min" in meta and value < meta["min"]:
        raise where.error(path, f"must be >= {meta['min']}, got {_num(value)}", f"use a value >= {meta['min']}")
    if "gt" in meta and value <= meta["gt"]:
        raise where.error(path, f"must be > {meta['gt']}, got {_num(value)}", "use a positive value")
    if "lt" in meta and value >= meta["lt"]:
        raise where.error(path, f"must be < {meta['lt']}, got {_num(value)}", f"use a value below {meta['lt']}")
    if hi is not None and value > hi:
        raise where.error(path, f"must be <= {_num(hi)}, got {_num(value)}", f"use a value <= {_num(hi)}{why}")
    return value


def check_value(value: Any, meta: dict, path: tuple, where: Where) -> Any:
    kind = meta["kind"]
    if value is None:
        if meta.get("nullable"):
            return None
        raise where.error(path, "must not be empty (null)", "give it a value or delete the line for the default")
    if kind == "auto_bool":
        if value == "auto" or isinstance(value, bool):
            return value
        raise where.error(path, f"unknown value {value!r}", "use auto, true or false")
    if kind == "auto_int":
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise where.error(path, f"expected a positive integer or auto, got {value!r}",
                              meta.get("auto_fix", "write auto (the largest that fits the GPU) or a divisor of "
                                                   "the per-GPU batch"))
        return _in_range(value, meta, path, where)
    if kind == "guidance":
        if value in (3, "3"):
            return 3
        if value == "all":
            return "all"
        raise where.error(path, f"unknown value {value!r}", "use 3 (guide the first 3 latent channels) or all")
    if kind is list:
        if not isinstance(value, list):
            raise where.error(path, f"expected a list, got {typename(value)} {value!r}",
                              f"write a YAML list, e.g. [{value}]")
        if meta.get("nonempty") and not value:
            raise where.error(path, "empty list", "give at least one value")
        item_meta = {k: v for k, v in meta.items() if k not in ("kind", "item", "nonempty")}
        out = [_scalar(v, meta["item"], item_meta, path + (i,), where) for i, v in enumerate(value)]
        seen: set = set()
        for i, v in enumerate(out):
            if v in seen:
                raise where.error(path + (i,), f"{v!r} is listed twice", "remove the duplicate")
            seen.add(v)
        return out
    if kind is dict:
        if not isinstance(value, dict):
            raise where.error(path, f"expected a mapping, got {typename(value)}", "write key: value pairs")
        return value
    return _scalar(value, kind, meta, path, where)


def section(cls: type, raw: Any, name: str, where: Where) -> Any:
    path = (name,)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise where.error(path, f"expected a mapping of settings, got {typename(raw)}",
                          f"write `{name}:` followed by indented key: value lines")
    allowed = [f.name for f in fields(cls)]
    check_keys(raw, allowed, path, where)
    kwargs = {f.name: check_value(raw[f.name], dict(f.metadata), path + (f.name,), where)
              for f in fields(cls) if f.name in raw}
    return cls(**kwargs)


