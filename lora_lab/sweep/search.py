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
from lora_lab.sweep.trials import TrialAttrs


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
        TrialAttrs.write(trial, derived={k: choice_value(v) for k, v in derived.items()})
    return [override(p, v) for p, v in {**values, **derived}.items()]


def values_of(spec: ParamSpec) -> list[Any] | None:
    """Every value a sampled entry can take, as stored by Optuna; None for a continuous (or huge) range."""
    if spec.type == "categorical":
        return [choice_value(c) for c in spec.choices]
    if spec.type == "int":
        step = int(spec.step or 1)
        n = (int(spec.high) - int(spec.low)) // step + 1
        return list(range(int(spec.low), int(spec.high) + 1, step)) if n <= 10_000 else None
    if spec.type == "float" and spec.step is not None:
        n = int(round((spec.high - spec.low) / spec.step)) + 1
        return [spec.low + i * spec.step for i in range(n)] if n <= 10_000 else None
    return None


def check_space(space: dict[str, ParamSpec]) -> None:
    """Everything a trial would find wrong with the space, found at load: log-scaled ranges with a step, `tied` to a
    value that is not a number, a `map` without an entry for some value of `of`; then the space is sampled once, so
    whatever Optuna itself refuses is refused here too, before any trial or storage exists."""
    for path, spec in space.items():
        key = f"sweep.space.{path}"
        if spec.type in ("float", "int") and spec.log and spec.step not in (None, 1):
            raise ConfigError(f"{key}: a log-scaled range cannot have a step (got step={spec.step}); drop one of them")
        if spec.type == "int":
            for name in ("low", "high", "step"):
                v = getattr(spec, name)
                if v is not None and float(v) != int(v):
                    raise ConfigError(f"{key}.{name}: expected an integer for type int, got {v!r}")
        if spec.type not in ("tied", "map"):
            continue
        values = values_of(space[spec.of])
        if spec.type == "tied":
            bad = [v for v in values or [] if isinstance(v, bool) or not isinstance(v, (int, float))]
            if bad:
                raise ConfigError(
                    f"{key}.of: tied needs `{spec.of}` to take numbers (value = ratio * {spec.of}), "
                    f"but it takes {', '.join(repr(b) for b in bad)}"
                )
        else:
            if values is None:
                raise ConfigError(
                    f"{key}.of: map needs `{spec.of}` to take a finite set of values (categorical, int, or a "
                    "float range with a step)"
                )
            missing = [str(v) for v in values if str(v) not in spec.map]
            if missing:
                raise ConfigError(
                    f"{key}.map: no entry for {spec.of}={', '.join(missing)}; entries: {', '.join(map(str, spec.map))}"
                )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    try:
        suggest(study.ask(), space)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"sweep.space: sampling it once failed: {type(exc).__name__}: {exc}") from None


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
    values = {**trial.params, **(TrialAttrs.read(trial).derived or {})}
    return [override(p, v) for p, v in values.items()]
