"""A sweep's points: train options given as comma lists make a grid (every combination), or a TOML
file lists the points (or a grid) explicitly. Pure: no files but the one named, no I/O beyond it."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from gpu_run.errors import ConfigError

# The train options a sweep may vary, with the type of one value. The order is the grid's order:
# the first key varies slowest, so points of one model stay together.
GRID_KEYS: dict[str, type] = {
    "model": str,
    "weights": str,
    "lr": float,
    "batch_size": int,
    "epochs": int,
    "image_size": int,
    "augment": str,
    "step_size": int,
    "gamma": float,
    "seed": int,
    "gpus": int,
    "amp": str,
    "decode": str,
    "workers": int,
}
CHOICES = {"augment": ("standard", "light", "none"), "amp": ("auto", "off"), "decode": ("auto", "cpu", "gpu")}
MAX_POINTS = 100  # a grid this large is a typo (a wrong comma); more than this is refused


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _value(key: str, raw, where: str):
    kind = GRID_KEYS[key]
    try:
        value: float | str
        if kind is float and not isinstance(raw, bool):
            value = float(raw)
        elif kind is int and not isinstance(raw, bool) and float(raw) == int(float(raw)):
            value = int(float(raw))
        elif kind is str and isinstance(raw, str) and raw.strip():
            value = raw.strip()
        else:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: {raw!r} is not a valid {'number' if kind in (int, float) else 'value'} for {option_name(key)}"
        ) from None
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: {option_name(key)} {value!r} is not one of {', '.join(CHOICES[key])}")
    return value


def parse_list(key: str, text: str) -> list:
    """`--lr 1e-3,1e-2` -> [0.001, 0.01]; empty items and repeats are refused (a stray comma)."""
    items = text.split(",")
    if any(not item.strip() for item in items):
        raise ConfigError(f"{option_name(key)} {text!r} has an empty item; write it as a,b,c")
    values = [_value(key, item, f"{option_name(key)} {text!r}") for item in items]
    if len(set(values)) != len(values):
        raise ConfigError(f"{option_name(key)} {text!r} names a value twice; each point would run twice")
    return values


def expand(lists: dict[str, list]) -> list[dict]:
    """Every combination of the lists, in GRID_KEYS order (the first key varies slowest)."""
    keys = [k for k in GRID_KEYS if k in lists]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(lists[k] for k in keys))]


def load_grid_file(path: Path) -> list[dict]:
    """A TOML file: `[grid]` with a list per option (every combination), and/or `[[points]]`
    tables, one per point, for an explicit list (a study that is not a full grid)."""
    try:
        document = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--grid {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--grid {path} is not valid TOML: {e}") from None
    unknown = set(document) - {"grid", "points"}
    if unknown:
        raise ConfigError(f"--grid {path}: unknown table(s) {', '.join(sorted(unknown))}; use [grid] and [[points]]")
    points: list[dict] = []
    grid = document.get("grid", {})
    if grid:
        lists = {}
        for key, values in grid.items():
            _known(key, path)
            values = values if isinstance(values, list) else [values]
            lists[key] = [_value(key, v, f"--grid {path} [grid] {key}") for v in values]
        points += expand(lists)
    for i, table in enumerate(document.get("points", []), 1):
        if not isinstance(table, dict) or not table:
            raise ConfigError(f"--grid {path}: [[points]] number {i} is empty")
        for key in table:
            _known(key, path)
        points.append({k: _value(k, v, f"--grid {path} point {i} {k}") for k, v in table.items()})
    if not points:
        raise ConfigError(f"--grid {path} lists no points; add a [grid] table or [[points]] tables")
    return points


def _known(key: str, path: Path) -> None:
    if key not in GRID_KEYS:
        raise ConfigError(
            f"--grid {path}: {key!r} is not an option a sweep can vary; use one of {', '.join(GRID_KEYS)}"
        )


def build_points(given: dict[str, str | None], grid_file: Path | None = None) -> tuple[dict, list[dict]]:
    """(values every point shares, each point's own values) from the command line's options (a
    comma list varies, one value is shared) and the --grid file. An option given on both is
    refused: which one wins would be a guess."""
    shared, lists = {}, {}
    for key, text in given.items():
        if text is None:
            continue
        values = parse_list(key, str(text))
        if len(values) == 1:
            shared[key] = values[0]
        else:
            lists[key] = values
    points = expand(lists) if lists else [{}]
    if grid_file is not None:
        from_file = load_grid_file(grid_file)
        both = sorted({k for p in from_file for k in p} & (set(shared) | set(lists)))
        if both:
            raise ConfigError(
                f"{', '.join(option_name(k) for k in both)} given on the command line and in --grid "
                f"{grid_file}; give each option in one place"
            )
        points = [{**f, **p} for f in from_file for p in points]
    if len(points) < 2 and grid_file is None:
        raise ConfigError(
            "a sweep needs at least two points: give an option as a comma list (--lr 1e-3,1e-2) or a --grid FILE.toml"
        )
    if len(points) > MAX_POINTS:
        raise ConfigError(f"the grid has {len(points)} points, more than {MAX_POINTS}; split the sweep")
    unique = {tuple(sorted(p.items())) for p in points}
    if len(unique) != len(points):
        raise ConfigError("the grid lists the same point twice; each point would run twice")
    return shared, points


# `{name}` in a command's words: filled from the grid's --set values.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def command_points(sets: tuple[str, ...], command: list[str]) -> list[dict]:
    """`--set lr=1e-3,1e-2 --set seed=1,2` -> every combination (the first --set varies slowest),
    each value a string for the command's placeholders. Every --set must be a placeholder of the
    command (otherwise its points would be the same run twice), every placeholder must have one."""
    wanted = [name for word in command for name in PLACEHOLDER.findall(word)]
    lists: dict[str, list[str]] = {}
    for given in sets:
        key, sep, text = given.partition("=")
        key = key.strip()
        if not sep or not PLACEHOLDER.fullmatch("{" + key + "}"):
            raise ConfigError(f"--set {given!r}: write it as NAME=V1,V2 (NAME as in {{NAME}} in the command)")
        if key in lists:
            raise ConfigError(f"--set {key} is given twice; give all its values in one --set {key}=a,b")
        items = [item.strip() for item in text.split(",")]
        if any(not item for item in items):
            raise ConfigError(f"--set {given!r} has an empty item; write it as {key}=a,b,c")
        if len(set(items)) != len(items):
            raise ConfigError(f"--set {given!r} names a value twice; each point would run twice")
        if key not in wanted:
            raise ConfigError(
                f"--set {key}: the command has no {{{key}}} to fill; put {{{key}}} where the value goes, "
                f"e.g. -- python train.py --{key} {{{key}}}"
            )
        lists[key] = items
    missing = [name for name in dict.fromkeys(wanted) if name not in lists]
    if missing:
        raise ConfigError(f"the command's {{{missing[0]}}} has no value; give it with --set {missing[0]}=a,b")
    if not lists:
        raise ConfigError(
            "a sweep of your own command needs a grid: put {name} in the command and give "
            "--set name=a,b (e.g. -- python train.py --lr {lr} with --set lr=1e-3,1e-2)"
        )
    points = [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]
    if len(points) < 2:
        raise ConfigError("a sweep needs at least two points: give a --set with two or more values")
    if len(points) > MAX_POINTS:
        raise ConfigError(f"the grid has {len(points)} points, more than {MAX_POINTS}; split the sweep")
    return points


def fill_command(command: list[str], point: dict) -> list[str]:
    """The command of one point: each {name} replaced by its value (other braces left alone)."""
    return [
        PLACEHOLDER.sub(lambda m: str(point[m.group(1)]) if m.group(1) in point else m.group(0), word)
        for word in command
    ]


def label(point: dict) -> str:
    """`model=resnet18 lr=0.001`: how a point is named in tables."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "(base)"
