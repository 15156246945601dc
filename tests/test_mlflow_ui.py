"""MLflow as a person sees it: two studies made by the real CLI (one with a failing trial and the full-FT comparison,
one where every trial fails), served by `mlflow ui` on a free 127.0.0.1 port, checked through its REST API and, where
Chromium is installed, in a headless browser (runs table, a run's description, its loss charts).

Set LORA_LAB_SCREENSHOTS=docs/img to keep the browser's screenshots (docs/mlflow.md shows them)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "tracking.system_metrics=false",
    "trainer.num_threads=1",
]
DEMO = """name: demo
description: Rank and learning rate of LoRA on the tiny model
overrides: [trainer.max_steps=6, trainer.eval_every=2, optim.grad_clip=0]
space:
  lora.r: {type: categorical, choices: [2, 8]}
  optim.lr: {type: categorical, choices: [3.0e-3, 1.0e20]}
sampler: grid
pruner: none
n_trials: 3
full_lr_grid: [1.0e-3]
"""
BROKEN = """name: broken
overrides: [trainer.max_steps=4, optim.grad_clip=0, optim.lr=1.0e20]
space:
  lora.r: {type: categorical, choices: [2, 4]}
sampler: grid
pruner: none
n_trials: 2
compare_full: false
"""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
MODE = "workflowType=machine_learning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    out = root / "outputs"
    env = dict(os.environ, LORA_LAB_OUTPUTS=str(out), OMP_NUM_THREADS="1")
    for name, text, code in (("demo", DEMO, 0), ("broken", BROKEN, 1)):
        (root / f"{name}.yaml").write_text(text)
        proc = subprocess.run(
            [sys.executable, "-m", "lora_lab.sweep", f"sweep={root / name}.yaml", *TINY],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == code, proc.stderr[-3000:]
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            f"sqlite:///{out / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        exps = api(base, "experiments/search", {"max_results": 100})["experiments"]
        runs = api(base, "runs/search", {"experiment_ids": [e["experiment_id"] for e in exps], "max_results": 500})
        yield {"base": base, "experiments": exps, "runs": runs["runs"], "root": root}
    finally:
        server.terminate()
        server.wait(timeout=30)


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def by_name(ui: dict) -> dict[str, dict]:
    return {r["info"]["run_name"]: r for r in ui["runs"]}


def test_experiment_is_model_training_with_a_description_and_no_default(ui):
    assert [e["name"] for e in ui["experiments"]] == ["lora_lab"]  # no stray "Default"
    t = {x["key"]: x["value"] for x in ui["experiments"][0]["tags"]}
    assert t["mlflow.experimentKind"] == "custom_model_development"
    assert "`loss/val` | nats/token" in t["mlflow.note.content"]


def test_names_states_and_descriptions(ui):
    runs = by_name(ui)
    assert set(runs) == {
        "demo",
        "demo/trial-0",
        "demo/trial-1 (FAIL)",
        "demo/trial-2",
        "demo/compare-lora-best",
        "demo/compare-full-lr0.001",
        "broken (FAIL)",
        "broken/trial-0 (FAIL)",
        "broken/trial-1 (FAIL)",
    }
    status = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
    for name, r in runs.items():
        t = tags(r)
        assert r["info"]["status"] == status[t["lora_lab.state"]], name  # one state, the same in tag, name, status
        assert name.endswith(f"({t['lora_lab.state']})") == (t["lora_lab.state"] != "COMPLETE"), name
        note = t["mlflow.note.content"]
        assert f"**State: {t['lora_lab.state']}**" in note, name
        if t["lora_lab.kind"] == "trial":
            assert f"Trial {t['lora_lab.trial']} of study `{t['lora_lab.study']}`" in note
            assert "Searched values: `lora.r=" in note
    assert "nats/token" in tags(runs["demo/trial-0"])["mlflow.note.content"]
    assert "non-finite" in tags(runs["demo/trial-1 (FAIL)"])["mlflow.note.content"]
    parent = tags(runs["demo"])["mlflow.note.content"]
    best = tags(runs["demo"])["best_trial"]
    best_id = runs[f"demo/trial-{best}"]["info"]["run_id"]
    assert f"[trial {best}](#/experiments/" in parent and f"/runs/{best_id}?{MODE})" in parent
    assert "[Compare the 3 trials](#/compare-runs?runs=" in parent and "Full fine-tune" in parent
    assert runs["broken (FAIL)"]["info"]["status"] == "FAILED"  # not a green "Finished"
    assert "No trial completed" in tags(runs["broken (FAIL)"])["mlflow.note.content"]


def test_metric_names_and_params(ui):
    runs = by_name(ui)
    for name, r in runs.items():
        keys = {m["key"] for m in r["data"].get("metrics", [])}
        assert keys and all("/" in k for k in keys), (name, keys)  # grouped names, no final.* duplicates
        params = {p["key"]: p["value"] for p in r["data"].get("params", [])}
        assert not {"trainable_params", "total_params", "wrapped_modules", "output_dir"} & set(params), name
        assert not any(v.endswith("'of': 'lora.r'}") for v in params.values()), name
    trial = runs["demo/trial-0"]
    keys = {m["key"] for m in trial["data"]["metrics"]}
    assert {
        "loss/train",
        "loss/val",
        "eval/accuracy",
        "perf/tokens_per_s",
        "params/trainable",
        "merge/val_loss",
    } <= keys
    params = {p["key"]: p["value"] for p in trial["data"]["params"]}
    assert params["lora.r"] == "2" and params["method"] == "lora" and params["optim.lr"] == "0.003"
    full = {p["key"] for p in runs["demo/compare-full-lr0.001"]["data"]["params"]}
    assert "optim.lr" in full and not any(k.startswith("lora.") for k in full)
    assert {m["key"] for m in runs["demo"]["data"]["metrics"]} >= {"loss/val", "trials/complete", "trials/fail"}


def _chromium(url: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,860",
            "--virtual-time-budget=25000",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed (scripts/setup.sh --test installs it where apt exists)"
)
def test_browser_shows_table_description_and_loss_chart(ui, tmp_path):
    runs = by_name(ui)
    exp = ui["experiments"][0]["experiment_id"]
    run_id = runs["demo/trial-0"]["info"]["run_id"]
    pages = {
        "runs_table": f"#/experiments/{exp}/runs?{MODE}",
        "run_overview": f"#/experiments/{exp}/runs/{run_id}?{MODE}",
        "run_charts": f"#/experiments/{exp}/runs/{run_id}/model-metrics?{MODE}",
        "study": f"#/experiments/{exp}/runs/{runs['demo']['info']['run_id']}?{MODE}",
    }
    needles = {
        "runs_table": "broken (FAIL)",
        "run_overview": "Trial 0 of study",
        "run_charts": "loss/val",
        "study": "Compare the 3 trials",
    }
    dom = {}
    for k, v in pages.items():  # the single-page app renders late under load: a few tries
        for _ in range(6):
            dom[k] = _chromium(f"{ui['base']}/{v}", "--dump-dom").stdout
            if needles[k] in dom[k]:
                break
    assert "demo" in dom["runs_table"] and "broken (FAIL)" in dom["runs_table"]
    assert "Trial 0 of study" in dom["run_overview"] and "nats/token" in dom["run_overview"]
    assert "loss/val" in dom["run_charts"] and "loss/train" in dom["run_charts"]
    assert "Compare the 3 trials" in dom["study"]
    keep = os.environ.get("LORA_LAB_SCREENSHOTS")
    for k, v in pages.items():
        png = tmp_path / f"mlflow_{k}.png"
        _chromium(f"{ui['base']}/{v}", f"--screenshot={png}")
        assert png.stat().st_size > 10_000, k
        if keep:
            from PIL import Image

            Path(keep).mkdir(parents=True, exist_ok=True)
            Image.open(png).convert("RGB").quantize(64).save(Path(keep) / png.name, optimize=True)
