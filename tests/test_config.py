"""Every config and study file composes and validates; bad values fail with the key in the message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_lab.config import CONF_DIR, SWEEPS_DIR, ConfigError, compose, load_sweep
from lora_lab.sweep import search

# Group options that need a matching option elsewhere to make a valid run.
PARTNERS = {("model", "minilm"): ["data=sentiment_head"], ("data", "sentiment_head"): ["model=minilm"]}


def group_options() -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml"))


@pytest.mark.parametrize("group,option", group_options())
def test_every_config_file_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}", *PARTNERS.get((group, option), [])]
    _, cfg = compose(overrides)
    # conf/baseline/ is a `# @package _global_` group: it sets top-level keys (method, its fields), no `baseline`
    assert cfg.method is not None if group == "baseline" else getattr(cfg, group) is not None
    if group == "lora":
        assert cfg.lora.r >= 1 and cfg.lora.alpha > 0


def test_every_yaml_starts_with_its_command() -> None:
    files = list(CONF_DIR.rglob("*.yaml")) + list(SWEEPS_DIR.glob("*.yaml"))
    assert files
    for path in files:
        lines = path.read_text().splitlines()
        first = lines[1] if lines[0] == "# @package _global_" else lines[0]  # Hydra wants its header on line 1
        # The command, optionally after environment settings: "# LORA_LAB_OUTPUTS=... python -m lora_lab.sweep ..."
        assert re.match(r"# (\w+=\S+ )*python -m lora_lab\.", first), (
            f"{path} does not start with the command that uses it"
        )


@pytest.mark.parametrize("name", sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
def test_every_study_file_loads_and_each_space_entry_composes(name: str) -> None:
    spec = load_sweep(name)
    assert spec.name == name and spec.space, name
    search.check_space(spec.space)  # sampled once, every tied/map entry resolvable
    _, base = compose(spec.overrides)
    for extra in search.preview(spec.space):
        compose(spec.overrides + extra)  # raises ConfigError on a bad value
    if spec.sampler == "grid":
        assert search.grid(spec.space)


def test_defaults_are_the_documented_ones() -> None:
    _, cfg = compose([])
    assert (cfg.model.name, cfg.data.name, cfg.data.format, cfg.method) == (
        "smollm2-135m-instruct",
        "vader_movies",
        "prompted",
        "lora",
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("lora.rr=3", "lora.rr"),
        ("lora.r=abc", "lora.r"),
        ("lora.r=0", "lora.r"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("lora.dropout=-0.1", "lora.dropout"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.batch_size=1.5", "trainer.batch_size"),
        ("method=qlora", "method"),
        ("optim.schedule=linear", "optim.schedule"),
        ("model=nope", "model/nope"),
        ("foo=1", "foo"),
    ],
)
def test_bad_override_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert key in str(err.value)


def test_unknown_key_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="expected one of: r, alpha"):
        compose(["lora.rank=8"])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text("# python -m lora_lab.sweep sweep=study.yaml\n" + text)
    return path


@pytest.mark.parametrize(
    "body,needle",
    [
        ("space:\n  optim.lr: {type: float, low: 1.0e-2, high: 1.0e-4, log: true}\n", "low <= high"),
        ("space:\n  lora.r: {type: categorical, choices: []}\n", "sweep.space.lora.r.choices"),
        (
            "objectives: [val_loss, trainable_params]\npruner: median\n"
            "space:\n  lora.r: {type: categorical, choices: [4]}\n",
            "sweep.pruner",
        ),
        ("space:\n  lora.r: {type: gaussian}\n", "sweep.space.lora.r.type"),
        ("sampler: annealing\n", "sweep.sampler"),
        ("n_trials: 0\n", "sweep.n_trials"),
        ("unknown_field: 1\n", "unknown_field"),
        ("space: [\n", "not valid YAML"),
    ],
)
def test_malformed_study_fails_naming_the_entry(tmp_path: Path, body: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_sweep(str(_write(tmp_path, body)))
    assert needle in str(err.value)


def test_unknown_study_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known studies: .*default"):
        load_sweep("no_such_study")


def test_search_overrides_round_trip() -> None:
    assert search.override("lora.targets", "q_proj,v_proj") == "lora.targets=[q_proj,v_proj]"
    assert search.override("lora.targets", "attn") == "lora.targets=[attn]"
    assert search.override("optim.lr", 0.0003) == "optim.lr=0.0003"
    assert search.override("lora.r", 16) == "lora.r=16"
    assert search.choice_value(["q_proj", "v_proj"]) == "q_proj,v_proj"
    _, cfg = compose([search.override("lora.targets", "q_proj,v_proj")])
    assert cfg.lora.targets == ["q_proj", "v_proj"]


# Non-finite numbers pass `> 0` range checks (inf > 0): every float field refuses nan and inf, naming its key.
NON_FINITE = [
    "optim.lr",
    "optim.lr_mult",
    "optim.ref_lr",
    "optim.eps",
    "optim.weight_decay",
    "optim.grad_clip",
    "lora.alpha",
    "lora.dropout",
    "lora.lr_ratio",
    "data.val_fraction",
]


@pytest.mark.parametrize("key", NON_FINITE)
def test_non_finite_numbers_are_refused(key: str) -> None:
    # nan and -inf already fail the range checks; inf passed them all
    with pytest.raises(ConfigError) as err:
        compose([f"{key}=inf"])
    assert key in str(err.value)


@pytest.mark.parametrize(
    "override,key,expected",
    [
        ("optim.eps=-1", "optim.eps", "> 0"),
        ("optim.eps=0", "optim.eps", "> 0"),
        ("optim.betas=[0.9,inf]", "optim.betas", "finite"),
        ("seed=-1", "seed", "[0, 4294967295]"),
        ("seed=4294967296", "seed", "[0, 4294967295]"),
        ("model.tiny.seed=-3", "model.tiny.seed", "[0, 4294967295]"),
        ("data.split_seed=-1", "data.split_seed", "[0, 4294967295]"),
        ("data.prompt_template='Review: {text} {title}'", "data.prompt_template", "{title}"),
        ("data.prompt_template='Review: {text} }'", "data.prompt_template", "doubled"),
        ("data.prompt_template='Review: {text} {'", "data.prompt_template", "doubled"),
        ("data.prompt_template='Review: {} {text}'", "data.prompt_template", "only fields"),
        ("data.text_column=''", "data.text_column", "non-empty"),
        ("data.label_words=['',' b']", "data.label_words", "non-empty"),
        ("lora.targets=['']", "lora.targets", "non-empty"),
        ("lora.layers=[-1]", "lora.layers", ">= 0"),
        ("lora.target_regex='(q_proj'", "lora.target_regex", "regular expression"),
        ("output_dir=''", "output_dir", "non-empty"),
        ("tracking.run_name=''", "tracking.run_name", "non-empty"),
    ],
)
def test_unvalidated_fields_name_their_key(override: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert str(err.value).startswith(key + ":") and expected in str(err.value), str(err.value)


def test_prompt_template_with_doubled_braces_is_fine() -> None:
    _, cfg = compose(["data.prompt_template='{{json}} {text} =>'"])
    assert cfg.data.prompt_template.format(text="x") == "{json} x =>"


@pytest.mark.parametrize(
    "override,key",
    [
        ("seed=-1", "sweep.seed"),
        ("seed=4294967296", "sweep.seed"),
        ("timeout_s=inf", "sweep.timeout_s"),
        ("full_lr=inf", "sweep.full_lr"),
        ("full_lr_grid=[1e-4,inf]", "sweep.full_lr_grid"),
        ("max_retry=-1", "sweep.max_retry"),
        ("pruner_startup_trials=-1", "sweep.pruner_startup_trials"),
        ("heartbeat_s=0", "sweep.heartbeat_s"),
        ("overrides=[lora.r]", "sweep.overrides"),
        ("storage=''", "sweep.storage"),
    ],
)
def test_study_fields_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_sweep("default", [override])
    assert key in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "entry,key",
    [
        ("optim.lr: {type: float, low: 1.0e-4, high: .inf, log: true}", "sweep.space.optim.lr.high"),
        ("optim.lr: {type: float, low: .nan, high: 1.0e-3}", "sweep.space.optim.lr.low"),
        ("lora.alpha: {type: tied, ratio: .inf}", "sweep.space.lora.alpha.ratio"),
        ("trainer.batch_size: {type: int, low: 2, high: 8, step: 0}", "sweep.space.trainer.batch_size.step"),
    ],
)
def test_non_finite_or_bad_space_numbers_name_the_entry(tmp_path: Path, entry: str, key: str) -> None:
    body = f"space:\n  lora.r: {{type: categorical, choices: [4, 8]}}\n  {entry}\n"
    with pytest.raises(ConfigError) as err:
        load_sweep(str(_write(tmp_path, body)))
    assert key in str(err.value), str(err.value)
