"""The table of the seven methods (lora_lab/adaptations.py), and the three defects that came from comparing method
names as strings in seven modules: every non-LoRA run described as "Full fine-tuning" in MLflow; the method's own
settings lost when read back from MLflow for every method but LoRA; and two definitions of "mergeable" that
disagreed on BitFit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_lab import adaptations, methods, records, tracking, train
from lora_lab.config import METHOD_CHOICES, compose
from lora_lab.records import Identity

TINY = ["model=tiny", "data=tiny_sentiment", "trainer=smoke", "trainer.progress=false", "tracking.system_metrics=false"]


def test_the_table_has_every_method_and_each_knows_its_label() -> None:
    assert tuple(adaptations.METHODS) == METHOD_CHOICES
    assert adaptations.of("lora") is adaptations.LORA and adaptations.of("full") is adaptations.FULL
    labels = {m.label for m in adaptations.METHODS.values()}
    assert len(labels) == len(METHOD_CHOICES)  # no two methods read alike
    with pytest.raises(ValueError, match="no such method 'qlora'.*lora, full, bitfit"):
        adaptations.of("qlora")
    # The mergeable ones are those whose merge leaves a plain model; the rest add computation.
    assert {m.name for m in adaptations.METHODS.values() if m.merges} == {"lora", "bitfit", "ia3"}
    assert {m.name for m in adaptations.METHODS.values() if m.warm_reusable} == {"lora", "full"}


@pytest.mark.parametrize("method", ["ia3", "prefix", "bitfit", "adapter", "prompt"])
def test_a_runs_mlflow_description_names_its_own_method(method: str) -> None:
    """Defect 1: every non-LoRA run's MLflow description said "Full fine-tuning"."""
    _, cfg = compose([*TINY, f"method={method}"])
    settings = train.settings_of(cfg, [])
    identity = Identity(kind="run", name="x", model="tiny", data="tiny_sentiment", device="cpu", output_dir="/x")
    note = tracking.run_note(identity, settings, {}, "COMPLETE", "", None, None)
    first = note.splitlines()[0]
    assert adaptations.of(method).label in first, first
    assert "Full fine-tuning" not in note and "full fine-tuning" not in first


@pytest.mark.parametrize(
    "method, own",
    [
        ("bitfit", {"bitfit.add_missing": True}),
        ("adapter", {"adapter.bottleneck": 16, "adapter.placement": "houlsby", "adapter.activation": "relu"}),
        ("prompt", {"prompt.n_tokens": 20, "prompt.init": "vocab"}),
        ("prefix", {"prefix.n_tokens": 10, "prefix.projection": False, "prefix.hidden": 512}),
        ("lora", {"lora.r": 8, "lora.alpha": 16.0}),
    ],
)
def test_a_methods_own_settings_read_back_from_mlflow_params(method: str, own: dict) -> None:
    """Defect 2: read back from MLflow, the method's own fields were kept only for LoRA (BitFit's, the adapters',
    prompt's and prefix's went to `overrides`), so metrics.json and MLflow disagreed on the same run."""
    _, cfg = compose([*TINY, f"method={method}"])
    written = train.settings_of(cfg, ["optim.lr=0.01"])
    for key, value in own.items():
        assert written.method_fields[key] == value
    group = adaptations.of(method).group
    back = records.Settings.from_params(written.params(), method_group=group)
    assert back == written  # method_fields included: nothing of the method's own moved to overrides


def test_bitfit_is_merge_checked_as_the_table_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 3: the training loop's "mergeable" (LoRA, IA3) and the methods module's (BitFit, IA3) disagreed: a
    BitFit run skipped the merge check that the methods module and the report count it for. One definition now:
    BitFit's trained biases are the model's own, so its merged model is the model itself, checked like the others."""
    monkeypatch.setenv("LORA_LAB_OUTPUTS", str(tmp_path))
    out = tmp_path / "run"
    code = train.main([*TINY, "method=bitfit", "optim.lr=1e-2", "tracking=off", f"output_dir={out}"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert adaptations.of("bitfit").merges
    assert m["merged_val_loss"] == m["val_loss"] and m["max_abs_logit_diff"] == 0.0 and m["merge_ok"] is True
    _, cfg = compose([*TINY, "method=bitfit"])
    session = train.build(cfg)
    adaptations.of("bitfit").merge(session.model)  # nothing to fold, and no refusal either
    methods.merge(session.model)


def test_each_comparison_row_is_built_from_its_methods_object() -> None:
    """One definition each: a comparison method's name, whether it merges and how it saves come from its
    lora_lab.methods.Kind; loading a file maps its peft_type to that same object."""
    rows = [m for m in adaptations.METHODS.values() if m.kind is not None]
    assert [m.name for m in rows] == list(methods.KINDS) == ["bitfit", "ia3", "adapter", "prompt", "prefix"]
    for row in rows:
        assert row.kind is methods.KINDS[row.name] and row.merges is row.kind.folds
        assert methods.BY_FILE_TYPE[row.kind.file_type] is row.kind
    assert adaptations.LORA.kind is None and adaptations.FULL.kind is None
    assert not hasattr(methods, "MERGEABLE")


PACKAGE = Path(adaptations.__file__).parent
MODULES = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "adaptations.py")


def _name_compares(path: Path) -> list[str]:
    """`<...method> == "x"` / `in ("x", ...)` comparisons of a method's name in one source file."""
    import ast

    def is_method(node: ast.AST) -> bool:
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
        return name.endswith("method")

    def is_text(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return bool(node.elts) and all(is_text(e) for e in node.elts)
        return isinstance(node, ast.Constant) and isinstance(node.value, str)

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_method(s) for s in sides) and any(is_text(s) for s in sides):
                found.append(f"{path.name}:{node.lineno}")
    return found


@pytest.mark.parametrize("module", MODULES)
def test_no_module_but_the_table_compares_a_methods_name(module: str) -> None:
    """The table is the one place that knows a method by its name: every other module asks the method's row (or,
    in the torch core, the method's object) instead."""
    assert _name_compares(PACKAGE / module) == []


def test_the_name_comparison_finder_finds_them(tmp_path: Path) -> None:
    path = tmp_path / "probe.py"
    path.write_text('if cfg.method == "lora":\n    pass\nif method in ("a", "b"):\n    pass\nx = self.method != "p"\n')
    assert _name_compares(path) == ["probe.py:1", "probe.py:3", "probe.py:5"]
