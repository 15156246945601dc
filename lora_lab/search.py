"""Search space -> `trial.suggest_*` -> Hydra overrides. The only module that calls `trial.suggest_*`.

Optuna parameter names are the override paths (`lora.r`, `optim.lr`), so a trial's params read back as the command
line that reproduces it: `python -m lora_lab.train lora.r=16 optim.lr=0.0003`.
"""

from __future__ import annotations

import functools
from typing import Any

import optuna
from omegaconf import ListConfig, OmegaConf

from lora_lab.config import Config, ConfigError, ParamSpec


@functools.lru_cache(maxsize=None)
def is_list_path(path: str) -> bool:
    """Whether the config field at `path` holds a list (lora.targets, lora.exclude...). Cached: the schema is fixed,
    and building it costs ~25 ms, paid for every override of every trial otherwise."""
    schema = OmegaConf.structured(Config)
    try:
        return isinstance(OmegaConf.select(schema, path, throw_on_missing=False), ListConfig)
    except Exception:
        return False


def choice_value(value: Any) -> Any:
    """Optuna stores categorical choices as scalars: a list choice (`[q_proj, v_proj]`) becomes 'q_proj,v_proj'."""
    if isinstance(value, (list, tuple, ListConfig)):
        return ",".join(str(v) for v in value)
    return value


def override(path: str, value: Any) -> str:
    """The Hydra override that sets `path` to `value`; list fields take 'a,b' or a list and become `[a,b]`."""
    if is_list_path(path):
        items = value.split(",") if isinstance(value, str) else list(value)
        return f"{path}=[{','.join(str(i).strip() for i in items)}]"
    if isinstance(value, float):
        return f"{path}={value!r}"
    if isinstance(value, bool):
        return f"{path}={str(value).lower()}"
    return f"{path}={value}"


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec]) -> list[str]:
    """Sample every entry of `space` for this trial and return the overrides, in the space's order.

    Tied entries (alpha = ratio * r) and fixed ones are derived, not sampled: they are stored as the trial's user
    attribute `derived` so best.yaml can still reproduce the trial.
    """
    values: dict[str, Any] = {}
    for path, spec in space.items():
        if spec.type == "categorical":
            values[path] = trial.suggest_categorical(path, [choice_value(c) for c in spec.choices])
        elif spec.type == "float":
            values[path] = trial.suggest_float(
                path,
                float(spec.low),
                float(spec.high),
                log=spec.log,
                step=None if spec.step is None else float(spec.step),
            )
        elif spec.type == "int":
            values[path] = trial.suggest_int(
                path, int(spec.low), int(spec.high), log=spec.log, step=1 if spec.step is None else int(spec.step)
            )
    derived: dict[str, Any] = {}
    for path, spec in space.items():
        if spec.type == "tied":
            if spec.of not in values:
                raise ConfigError(f"sweep.space.{path}.of: '{spec.of}' is not a sampled entry of the space")
            derived[path] = float(spec.ratio) * float(values[spec.of])
        elif spec.type == "map":
            if spec.of not in values:
                raise ConfigError(f"sweep.space.{path}.of: '{spec.of}' is not a sampled entry of the space")
            key = str(values[spec.of])
            if key not in spec.map:
                raise ConfigError(
                    f"sweep.space.{path}.map: no entry for {spec.of}={key}; entries: {', '.join(spec.map)}"
                )
            derived[path] = spec.map[key]
        elif spec.type == "fixed":
            derived[path] = spec.value
    if derived:
        trial.set_user_attr("derived", {k: choice_value(v) for k, v in derived.items()})
    return [override(p, v) for p, v in {**values, **derived}.items()]


def grid(space: dict[str, ParamSpec]) -> dict[str, list[Any]]:
    """The search space of Optuna's GridSampler: every categorical entry's choices (ranges need `step`)."""
    out: dict[str, list[Any]] = {}
    for path, spec in space.items():
        if spec.type == "categorical":
            out[path] = [choice_value(c) for c in spec.choices]
        elif spec.type in ("float", "int"):
            if spec.step is None:
                raise ConfigError(f"sweep.space.{path}: the grid sampler needs categorical choices or a step")
            n = int(round((spec.high - spec.low) / spec.step)) + 1
            out[path] = [spec.low + i * spec.step for i in range(n)]
            if spec.type == "int":
                out[path] = [int(v) for v in out[path]]
    return out


def preview(space: dict[str, ParamSpec]) -> list[list[str]]:
    """Override sets that cover each entry's extremes, to validate a study before its first trial."""
    sets: list[list[str]] = []
    for path, spec in space.items():
        if spec.type == "categorical":
            sets += [[override(path, choice_value(c))] for c in spec.choices]
        elif spec.type in ("float", "int"):
            cast = int if spec.type == "int" else float
            sets += [[override(path, cast(spec.low))], [override(path, cast(spec.high))]]
        elif spec.type == "fixed":
            sets.append([override(path, spec.value)])
        elif spec.type == "map":
            sets += [[override(spec.of, k), override(path, v)] for k, v in spec.map.items()]
    return sets


def trial_overrides(trial: optuna.trial.FrozenTrial) -> list[str]:
    """The overrides a finished trial ran with (sampled params, then derived values)."""
    values = {**trial.params, **trial.user_attrs.get("derived", {})}
    return [override(p, v) for p, v in values.items()]
