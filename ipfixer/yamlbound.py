"""Bounded YAML: every YAML file ipfixer reads (the config, template files, IPFIXER_* values) goes
through here, so a hostile or huge input is refused in milliseconds instead of hanging or filling memory.

The bounds are checked on the YAML event stream before anything is built: the shipped config is 5 KB
with ~200 nodes, so these are generous for a real file and stop a "billion laughs" (nested aliases) or a
deep/huge file, in `check` and in a SIGHUP reload alike. Duplicate keys are refused (the second would
silently win). Errors are ConfigError / ConfigLimitError naming the source; `kind` says in the message
what the input is ("a config", "a template file").
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from ipfixer.errors import ConfigError, ConfigLimitError

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32  # nested mappings/sequences
MAX_NODES = 50_000  # scalars + collections, counting each alias as the whole node it stands for
MAX_ALIASES = 64  # and as many anchors and merge keys (`<<`)


_EventParser: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: faster


class _Loader(_EventParser):  # type: ignore[misc]
    """SafeLoader (libyaml's when present) that refuses duplicate keys (the second one would silently win)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:  # the node's own keys: a key given beside a merge (<<) overrides it
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = loader.construct_mapping(node, deep=deep)
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def check_yaml_bounds(text: str, source: str, kind: str = "a config") -> None:
    """Refuse YAML whose expansion would be large or deep (ConfigLimitError), from the event stream only.

    An alias counts as the whole node it names, so `a: &a [1,1,1,1,1,1,1,1,1]`, `b: &b [*a,*a,...]`, ...
    (a "billion laughs") is refused when the running total passes MAX_NODES, long before it is built.
    A syntax error is left to the loader, which reports it with its line and column.
    """
    if len(text) > MAX_FILE_BYTES:
        raise ConfigLimitError(source, "size in bytes", len(text.encode("utf-8")), MAX_FILE_BYTES, kind)
    sizes: dict[str, int] = {}  # anchor -> expanded node count of the node it names
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, total when the collection started)
    counts = {"aliases": 0, "anchors": 0, "merge keys (<<)": 0}
    total = 0
    try:
        for event in yaml.parse(text, Loader=_EventParser):
            anchor = getattr(event, "anchor", None)
            if isinstance(event, yaml.AliasEvent):
                counts["aliases"] += 1
                if any(a == anchor for a, _ in open_nodes):
                    raise ConfigError(f"{source}: alias *{anchor} is inside the node it refers to (a cycle)")
                total += sizes.get(str(anchor), 1)
            elif isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
                total += 1
                if anchor is not None:
                    counts["anchors"] += 1
                if isinstance(event, yaml.CollectionStartEvent):
                    open_nodes.append((anchor, total - 1))
                    if len(open_nodes) > MAX_DEPTH:
                        raise ConfigLimitError(source, "nesting depth", len(open_nodes), MAX_DEPTH, kind)
                else:
                    if event.value == "<<" and event.implicit[0]:
                        counts["merge keys (<<)"] += 1
                    if anchor is not None:
                        sizes[anchor] = 1
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, start = open_nodes.pop()
                if anchor is not None:
                    sizes[anchor] = total - start
            for what, n in counts.items():
                if n > MAX_ALIASES:
                    raise ConfigLimitError(source, f"YAML {what}", n, MAX_ALIASES, kind)
            if total > MAX_NODES:
                raise ConfigLimitError(source, "YAML nodes (aliases expanded)", total, MAX_NODES, kind)
    except yaml.YAMLError:
        return


def load_yaml_text(text: str, source: str, kind: str = "a config") -> Any:
    """Parse one YAML document within the bounds above; ConfigError (with line:column) on any problem."""
    check_yaml_bounds(text, source, kind)
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        what = "; ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(f"{source}{at}: YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: YAML syntax error: {e}") from None
    except RecursionError:  # cannot happen within MAX_DEPTH; kept so no traceback can ever escape
        raise ConfigError(f"{source}: nested too deeply") from None




def read_yaml_file(path: Path, kind: str = "a config", regular_only: bool = False) -> Any:
    """One YAML file, read boundedly (at most MAX_FILE_BYTES + 1 bytes: /dev/zero is refused too) and
    parsed as load_yaml_text does. regular_only: refuse anything but a regular file (a FIFO found in a
    directory would block the reader forever); opened non-blocking to look first."""
    what = kind.removeprefix("a ").removeprefix("an ")
    what = what if what.endswith(" file") else f"{what} file"  # "config file", "template file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK if regular_only else os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if regular_only and not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigLimitError(str(path), "size in bytes", max(st.st_size, len(raw)), MAX_FILE_BYTES, kind)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file: {e}") from None
    return load_yaml_text(text, str(path), kind)
