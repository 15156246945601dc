"""MLflow as a person sees it: two studies made by the sweep command (its main, run in the test's process: one with
a failing, two pruned trials and the full-FT comparison, one where every trial fails), served by `mlflow ui` on a free
127.0.0.1 port, checked through its REST API and, where Chromium is installed, in a headless browser driven over the
DevTools protocol: what a study's page shows above the fold without a click, the prepared runs-table view, a failed
trial, the loss charts.

The browser window is 1280x860 with MLflow's assistant panel closed (it opens itself on a local server's first visit
and takes a quarter of the width: closed, the description is the page's first block). Set
LORA_LAB_SCREENSHOTS=docs/img to keep the browser's screenshots (docs/mlflow.md shows them)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sweeprun import sweep_here

from lora_lab import notes
from lora_lab.records import Identity, RunRecord, Settings

TINY = [
    "model=tiny",
    "data=tiny_sentiment",
    "trainer=smoke",
    "trainer.progress=false",
    "tracking.system_metrics=false",
    "trainer.num_threads=1",
]
# Grid order: (r=2, 3e-3) completes; (2, 1e20) diverges; (2, 1e-7) learns nothing and is pruned at its first
# evaluation; (8, 3e-3) runs against the median. Two full-FT LRs: the comparison says which one it chose.
DEMO = """name: demo
description: Rank and learning rate of LoRA on the tiny model
overrides: [trainer.max_steps=6, trainer.eval_every=2, optim.grad_clip=0]
space:
  lora.r: {type: categorical, choices: [2, 8]}
  optim.lr: {type: categorical, choices: [3.0e-3, 1.0e20, 1.0e-7]}
sampler: grid
pruner: median
pruner_startup_trials: 1
n_trials: 4
full_lr_grid: [3.0e-4, 1.0e-3]
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


# ----------------------------------------------------------------------------------------------- the text alone


def _settings(method: str = "lora", lr: float = 3e-3) -> Settings:
    return Settings(
        method=method, model="tiny", data="d", seed=0, lr=lr, batch_size=4, grad_accum=1, max_steps=6,
        max_length=8, precision="fp32", device="cpu", method_fields={"lora.r": 2} if method == "lora" else {},
    )  # fmt: skip


def _record(method: str, val_loss: float, trainable: int, lr: float, device: str = "cpu") -> RunRecord:
    identity = Identity(kind="compare", name=f"s/{method}", study="s", model="tiny", data="d", device=device,
                        output_dir=f"/x/{method}")  # fmt: skip
    return RunRecord(
        status="completed", steps=6, val_loss=val_loss, base_val_loss=5.6, trainable_params=trainable,
        total_params=100_000, peak_mem_bytes=2**30, time_per_step_s=0.01, tokens_per_s=1e4, train_time_s=1.0,
        eval_time_s=0.1, setup_time_s=0.1, merged_val_loss=val_loss if method == "lora" else None,
        max_abs_logit_diff=2e-7 if method == "lora" else None, merge_ok=True if method == "lora" else None,
        identity=identity, settings=_settings(method, lr),
    )  # fmt: skip


def test_numbers_names_and_the_comparison_read_for_people() -> None:
    assert notes.human(0.04894436565281434) == "0.04894" and notes.human(0.0013795935057850982) == "0.00138"
    assert notes.human(1e20) == "1e20" and notes.human(3e-5) == "3e-5" and notes.human(2048) == "2,048"
    assert notes.human(25342.7) == "25,343" and notes.human(float("nan")) == "-" and notes.human(None) == "-"
    assert notes.count(1, "step") == "1 step" and notes.count(6, "step") == "6 steps"
    assert notes.rounded_overrides("lora.r=16 optim.lr=0.00031833124771012106 lora.targets=[all-linear]") == (
        "lora.r=16 optim.lr=0.0003183 lora.targets=[all-linear]"
    )
    assert notes.vs_base(5.6133, 5.6139) == "-0.0006 (did not learn)" and notes.vs_base(5.17, 5.61) == "-0.44"
    # Names lead with what tells them apart, and read back to the run's identity (older names too).
    for name, study, state, shown in (
        ("demo/trial-1", "demo", "FAIL", "FAIL trial-1 · demo"),
        ("demo/trial-0", "demo", "COMPLETE", "trial-0 · demo"),
        ("methods_tiny/full-ft-lr0.001", "methods_tiny", "COMPLETE", "full-ft-lr0.001 · methods_tiny"),
        ("lora-tiny-d", "", "PRUNED", "PRUNED lora-tiny-d"),
    ):
        assert notes.display_name(name, study, state) == shown
        assert notes.identity_name(shown, study) == name
    assert notes.identity_name("demo/trial-1 (FAIL)", "demo") == "demo/trial-1"
    # The comparison: one row per side (the merge check is a line), the winner, the chosen LR at the grid's edge,
    # peak memory only where it compares (CUDA), "did not learn" at a glance.
    lora, full = _record("lora", 5.175, 4096, 3e-3), _record("full", 4.591, 90624, 1e-3)
    c = notes.Comparison(best=lora, full=full, trial=0, best_overrides="lora.r=2 optim.lr=0.003", grid=[3e-4, 1e-3])
    md = c.markdown()
    assert md.count("\n| ") == 2 and "(trial 0, retrained)" in md and "full fine-tuning (LR 0.001)" in md
    assert "full FT beats LoRA by 0.584 nats/token val loss (5.175 vs 4.591)" in md
    assert "**Full FT's LR 0.001 is at the upper edge of `sweep.full_lr_grid`**" in md
    assert "Merged into the weights: val loss 5.175 (the same as unmerged)" in md
    assert "peak CUDA memory" not in md and "Peak memory is left out" in md and "4.52%" in md
    inside = notes.Comparison(best=lora, full=full, grid=[3e-4, 1e-3, 3e-3])
    assert inside.edge_warning() == "" and "edge" not in inside.lr_line()
    gpu = notes.Comparison(best=_record("lora", 5.0, 1, 1e-3, "cuda:0"), full=_record("full", 5.1, 9, 1e-3, "cuda"))
    assert "peak CUDA memory (MiB)" in gpu.markdown() and "beats full FT by 0.1 nats/token" in gpu.markdown()
    # A method study is labelled by its methods, and its trials table says each trial's.
    ran = [("ia3", "tiny", "d", 60), ("lora", "tiny", "d", 60), ("full", "tiny", "d", 60)]
    assert notes.as_run(ran) == "LoRA, full fine-tuning, IA3 of `tiny` on `d`, 60 steps per trial"
    lines = [
        notes.TrialLine(number=n, state=s, url="#", values={"val_loss": v}, val_loss=v, accuracy=None,
                        base_val_loss=5.6, trainable=10, method=m, searched="baseline=x", reason="")
        for n, (s, v, m) in enumerate([("COMPLETE", 5.5, "ia3"), ("COMPLETE", 5.0, "lora"), ("FAIL", None, "full")])
    ]  # fmt: skip
    rows = notes.trials_table(lines, ["val_loss"], maximize=False).splitlines()
    assert rows[0].startswith("| trial | state | method |") and rows[2].startswith("| [1](#) | COMPLETE | LoRA | 5 |")
    assert rows[4].startswith("| [2](#) | FAIL | full fine-tuning | - |")
    flat = _record("ia3", 5.5995, 10, 3e-4)
    note = notes.run_note(flat.identity, flat.settings, {}, "COMPLETE", "", flat, None)
    assert "**did not learn**" in note.split("\n\n")[0]


def test_the_prepared_view_is_the_one_the_installed_mlflow_ui_reads() -> None:
    """The view lives in an experiment tag that MLflow's UI reads when the URL names it (its "share view"): UI-
    internal, so pinned here against the JavaScript of the installed MLflow."""
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    bundle = "".join(p.read_text(errors="ignore") for p in js.glob("*.js"))
    assert f'"{notes.VIEW_PARAM}"' in bundle and f'"{notes.VIEW_TAG_PREFIX}"' in bundle
    facets = re.search(r'\["searchFilter","orderByKey","orderByAsc"[^\]]*\]', bundle)
    state = re.search(r'\["selectedColumns","columnOrder","columnWidths"[^\]]*\]', bundle)
    assert facets and state, "the UI's lists of shareable view keys have moved"
    known = set(json.loads(facets.group(0))) | set(json.loads(state.group(0)))
    view = notes.study_view("demo", ["val_loss"], False, ["lora.r", "optim.lr"], methods_vary=False)
    assert set(view) <= known, set(view) - known
    assert '=(e,t)=>e+".`"+t+"`"' in bundle  # the UI keys a column `kind.\`name\`` (makeCanonicalSortKey)
    assert all(re.fullmatch(r"(tags|metrics|params|attributes)\.`[^`]+`", c) for c in view["selectedColumns"])


# ----------------------------------------------------------------------------------------------- the studies


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
        # The command's main in this process (the same runs; a process of its own cost ~12 s more CPU).
        ended, said = sweep_here(out, [f"sweep={root / name}.yaml", *TINY])
        assert ended == code, said[-3000:]
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
        env=dict(env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no job runner: see servers.server_env
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
        yield {"base": base, "experiments": exps, "runs": runs["runs"], "root": root, "out": out}
    finally:
        server.terminate()
        server.wait(timeout=30)


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def by_name(ui: dict) -> dict[str, dict]:
    return {r["info"]["run_name"]: r for r in ui["runs"]}


def first_lines(note: str) -> list[str]:
    """A description's first paragraph, line by line (what MLflow shows before "Show more")."""
    return note.split("\n\n")[0].split("  \n")


def test_experiment_is_model_training_with_a_description_and_no_default(ui):
    assert [e["name"] for e in ui["experiments"]] == ["lora_lab"]  # no stray "Default"
    t = {x["key"]: x["value"] for x in ui["experiments"][0]["tags"]}
    assert t["mlflow.experimentKind"] == "custom_model_development"
    note = t["mlflow.note.content"]
    assert "| `loss/val` | nats/token |" in note and "| `base/loss_val` | nats/token |" in note
    exp = ui["experiments"][0]["experiment_id"]
    # Its first line links each study's prepared view (the runs page shows only that much of it).
    assert note.startswith("**Studies**") and f"[demo]({notes.view_url(exp, 'demo')})" in note.split("\n")[0]


def test_names_states_and_descriptions(ui):
    runs = by_name(ui)
    trials = {int(tags(r)["lora_lab.trial"]): r for r in runs.values() if tags(r).get("lora_lab.study") == "demo"
              and tags(r)["lora_lab.kind"] == "trial"}  # fmt: skip
    assert {n: tags(r)["lora_lab.state"] for n, r in trials.items() if n < 3} == {0: "COMPLETE", 1: "FAIL", 2: "PRUNED"}
    expected = {
        "demo",
        "rerun-trial-0 · demo",
        "full-ft-lr0.0003 · demo",
        "full-ft-lr0.001 · demo",
        "FAIL broken",
        "FAIL trial-0 · broken",
        "FAIL trial-1 · broken",
    } | {notes.display_name(f"demo/trial-{n}", "demo", tags(r)["lora_lab.state"]) for n, r in trials.items()}
    assert set(runs) == expected
    status = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
    for name, r in runs.items():
        t = tags(r)
        state = t["lora_lab.state"]
        assert r["info"]["status"] == status[state], name  # one state, the same in tag, name, status
        assert name.startswith(f"{state} ") == (state != "COMPLETE"), name  # the state first: never cut off
        note = t["mlflow.note.content"]
        lines = first_lines(note)
        if t["lora_lab.kind"] == "study":  # its first lines are its answer; its state follows
            assert f"\n\n**State: {state}** · study `{t['lora_lab.study']}`" in note, name
        else:  # the first line: what it is and how it ended
            assert lines[0].startswith(f"**State: {state}**"), name
        if t["lora_lab.kind"] == "trial":
            assert f"Trial {t['lora_lab.trial']} of study [{t['lora_lab.study']}](#/experiments/" in lines[0]
            assert "LoRA (r=" in lines[0] and "Searched values: `lora.r=" in note
    best = tags(runs["trial-0 · demo"])
    assert (
        "val loss **5.1" in first_lines(best["mlflow.note.content"])[1] and "nats/token" in best["mlflow.note.content"]
    )
    fail = tags(runs["FAIL trial-1 · demo"])["mlflow.note.content"]
    assert first_lines(fail)[1].startswith("**No result**: diverged: non-finite training loss at step")
    pruned = tags(runs["PRUNED trial-2 · demo"])["mlflow.note.content"]
    assert first_lines(pruned)[1].startswith("**Pruned at step 2**") and "did not learn" in first_lines(pruned)[1]
    assert runs["FAIL broken"]["info"]["status"] == "FAILED"  # not a green "Finished"
    assert first_lines(tags(runs["FAIL broken"])["mlflow.note.content"])[0].startswith(
        "**No trial completed**: 2 trials"
    )


def test_the_study_answers_in_its_first_lines_metrics_and_marks(ui):
    runs = by_name(ui)
    exp = ui["experiments"][0]["experiment_id"]
    parent = runs["demo"]
    m = metrics(parent)
    best, full = metrics(runs["trial-0 · demo"]), metrics(runs["full-ft-lr0.001 · demo"])
    lower = metrics(runs["full-ft-lr0.0003 · demo"])
    assert full["loss/val"] < lower["loss/val"]  # the chosen full-FT run is the better LR
    assert m["best/loss_val"] == best["loss/val"] == m["loss/val"] and m["full/loss_val"] == full["loss/val"]
    assert m["delta/loss_val_vs_full"] == pytest.approx(best["loss/val"] - full["loss/val"])
    assert m["best/params_trainable"] == best["params/trainable"] and m["full/lr"] == 1e-3
    assert m["best/params_share"] == pytest.approx(best["params/trainable"] / full["params/trainable"])
    assert {m["trials/complete"], m["trials/fail"]} == {1.0} and m["trials/pruned"] >= 1
    # One filter finds each: the best trial, its retrained copy, the chosen full-FT run.
    marked = {name: tags(r).get("lora_lab.best") for name, r in runs.items() if tags(r).get("lora_lab.best")}
    assert marked == {"trial-0 · demo": "trial", "rerun-trial-0 · demo": "rerun", "full-ft-lr0.001 · demo": "full-ft"}
    # Only COMPLETE trials have an objective value: nothing sorts a pruned trial's intermediate loss among results.
    assert {n for n, r in runs.items() if "objective/val_loss" in metrics(r)} == {"trial-0 · demo"}
    lines = first_lines(tags(parent)["mlflow.note.content"])
    d = m["delta/loss_val_vs_full"]
    who = f"LoRA beats full FT by {notes.human(-d)}" if d < 0 else f"full FT beats LoRA by {notes.human(d)}"
    best_id = runs["trial-0 · demo"]["info"]["run_id"]
    assert lines[0].startswith(f"**Best: [trial 0](#/experiments/{exp}/runs/{best_id}?{MODE})**: {who} nats/token")
    share = notes.percent(m["best/params_share"])
    assert lines[1].startswith(f"{int(m['best/params_trainable']):,} trainable params, {share} of full FT's 90,624")
    assert lines[1].endswith(f"{notes.state_counts({'COMPLETE': 1, 'FAIL': 1, 'PRUNED': int(m['trials/pruned'])})}")
    assert lines[2].startswith("`lora.r=2 optim.lr=0.003`") and notes.view_url(exp, "demo") in lines[2]
    assert "[compare them](#/compare-runs?runs=" in lines[2]
    assert "upper edge of `sweep.full_lr_grid`" in lines[3]  # 1e-3 is the grid's top: full FT may do better
    note = tags(parent)["mlflow.note.content"]
    assert "as run: LoRA of `tiny` on `synthetic_sentiment`, 6 steps per trial" in note
    assert "Merged into the weights" in note and note.count("(trial 0, retrained)") == 1  # one merge line, one row
    table = (ui["out"] / "studies" / "demo" / "comparison.md").read_text()
    assert "full fine-tuning (LR 0.001)" in table and "optim.lr=0.001" in table and "upper edge" in table


def test_curves_and_metric_names(ui):
    runs = by_name(ui)
    for name, r in runs.items():
        keys = set(metrics(r))
        assert keys and all("/" in k for k in keys), (name, keys)  # grouped names, no final.* duplicates
        params = {p["key"]: p["value"] for p in r["data"].get("params", [])}
        assert not {"trainable_params", "total_params", "wrapped_modules", "output_dir"} & set(params), name
        assert not any(v.endswith("'of': 'lora.r'}") for v in params.values()), name
    trial = runs["trial-0 · demo"]
    assert {
        "loss/train",
        "loss/val",
        "eval/accuracy",
        "base/loss_val",
        "base/accuracy",
        "perf/tokens_per_s",
        "params/trainable",
        "merge/val_loss",
    } <= set(metrics(trial))
    params = {p["key"]: p["value"] for p in trial["data"]["params"]}
    assert params["lora.r"] == "2" and params["method"] == "lora" and params["optim.lr"] == "0.003"
    full = {p["key"] for p in runs["full-ft-lr0.001 · demo"]["data"]["params"]}
    assert "optim.lr" in full and not any(k.startswith("lora.") for k in full)
    # A failed trial: no result at all (not the base model's numbers), the steps it made, where it went non-finite.
    fail = metrics(runs["FAIL trial-1 · demo"])
    assert not {"loss/val", "eval/accuracy"} & set(fail) and "base/loss_val" in fail
    assert "loss/train" in fail and fail["stop/nonfinite_step"] >= 1
    assert metrics(runs["PRUNED trial-2 · demo"])["stop/pruned_step"] == 2
    trials = (ui["out"] / "studies" / "demo" / "trials.csv").read_text().splitlines()
    assert trials[0].startswith("number,state,value_val_loss,method,lr,") and trials[1].startswith("0,COMPLETE,")
    assert ",lora,0.003," in trials[1]


# ----------------------------------------------------------------------------------------------- the browser


class Browser:
    """Headless Chromium driven over the DevTools protocol (a websocket, spoken here with the standard library):
    open a page, wait for its text, ask it where things are, take a screenshot."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 860) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={width},{height}", f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as resp:
                    page = next(t for t in json.loads(resp.read()) if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                assert time.time() < deadline and self.proc.poll() is None, "Chromium did not start"
                time.sleep(0.3)
        hostport, path = page["webSocketDebuggerUrl"][len("ws://") :].split("/", 1)
        self.sock = socket.create_connection(("127.0.0.1", int(hostport.rsplit(":", 1)[1])), timeout=120)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(4096)
        assert b" 101 " in head.split(b"\r\n")[0], head[:200]
        self.buf, self.n = head.split(b"\r\n\r\n", 1)[1], 0
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            assert chunk, "Chromium closed the connection"
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def call(self, method: str, **params: Any) -> dict:
        self.n += 1
        data = json.dumps({"id": self.n, "method": method, "params": params}).encode()
        size = bytes([0x80 | len(data)]) if len(data) < 126 else bytes([0x80 | 126]) + struct.pack(">H", len(data))
        mask = os.urandom(4)
        self.sock.sendall(b"\x81" + size + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(data)))
        while True:
            message = b""
            while True:  # one message, perhaps in fragments
                b1, b2 = self._read(2)
                n = b2 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read(8))[0]
                message += self._read(n)
                if b1 & 0x80:
                    break
            reply = json.loads(message)
            if reply.get("id") == self.n:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, url: str, needle: str, timeout: float = 60) -> None:
        """Go to `url` and wait until the page's text holds `needle` (the single-page app renders late)."""
        self.call("Page.navigate", url=url)
        self.wait(needle, timeout)

    def wait(self, needle: str, timeout: float = 60) -> None:
        """Wait until the page's text holds `needle`."""
        deadline = time.time() + timeout
        while needle not in (self.js("document.body ? document.body.textContent : ''") or ""):
            assert time.time() < deadline, f"{self.js('location.href')}: {needle!r} never appeared"
            time.sleep(0.5)
        time.sleep(1.0)  # let the layout settle (fonts, late columns)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        with __import__("contextlib").suppress(OSError):
            self.sock.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


# Where each needle is drawn, and whether a person reads it there without a click: inside the window, inside every
# box that clips it (MLflow folds a description to 100 px), and not under more than a quarter of the white fade
# MLflow lays over the folded part.
READABLE = """(needles => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const nodes = []; let text = "";
  while (walker.nextNode()) { nodes.push([walker.currentNode, text.length]); text += walker.currentNode.textContent; }
  const at = i => {
    let k = 0; while (k + 1 < nodes.length && nodes[k + 1][1] <= i) k++;
    return [nodes[k][0], i - nodes[k][1]]; };
  const fades = [...document.querySelectorAll("*")].filter(e => {
    const cs = getComputedStyle(e); return cs.position === "absolute" && cs.backgroundImage.includes("gradient"); });
  return needles.map(needle => {
    const i = text.indexOf(needle);
    if (i < 0) return {needle, found: false};
    const [a, ao] = at(i), [b, bo] = at(i + needle.length - 1);
    const range = document.createRange(); range.setStart(a, ao); range.setEnd(b, bo + 1);
    const rects = [...range.getClientRects()].filter(r => r.width > 0);
    const top = Math.min(...rects.map(r => r.top)), bottom = Math.max(...rects.map(r => r.bottom));
    let clipped = false;
    for (let e = a.parentElement; e; e = e.parentElement) {
      const cs = getComputedStyle(e);
      if (cs.overflowY === "visible") continue;
      const r = e.getBoundingClientRect(); if (bottom > r.bottom + 1 || top < r.top - 1) clipped = true;
    }
    let faded = 0; const mid = (top + bottom) / 2;
    for (const f of fades) {
      const r = f.getBoundingClientRect();
      const over = mid > r.top && mid < r.bottom && rects[0].left < r.right && rects[0].right > r.left;
      if (over) faded = Math.max(faded, (mid - r.top) / r.height); }
    return {needle, found: true, top, bottom, clipped, faded, inside: top >= 0 && bottom <= innerHeight};
  });
})"""

ROWS = """(() => { const out = {};
  for (const r of document.querySelectorAll('[role="row"][row-index]')) {
    const i = r.getAttribute("row-index"); out[i] = out[i] || {};
    for (const c of r.querySelectorAll("[col-id]")) {
      const name = c.querySelector("a"); out[i][c.getAttribute("col-id")] = (name || c).innerText.trim();
      if (name) out[i]["name_cut"] = name.scrollWidth > name.clientWidth + 1; } }
  return Object.values(out); })()"""


def _table_rows(b: Browser, name: str, timeout: float = 60) -> list[dict]:
    """The runs table's rows (ROWS) once a row names `name`: the name can be in the page's text before the table
    has drawn its rows (seen on a loaded machine: the needle found, no row yet)."""
    deadline = time.time() + timeout
    while not any(name in r.get("attributes.`Run Name`", "") for r in b.js(ROWS)):
        assert time.time() < deadline, f"{b.js('location.href')}: no table row names {name!r}"
        time.sleep(0.5)
    time.sleep(1.0)  # let the rest of the rows and columns draw
    return b.js(ROWS)


@pytest.fixture(scope="module")
def browser(ui, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (scripts/setup.sh --test installs it where apt exists)")
    b = Browser(tmp_path_factory.mktemp("chromium"))
    # As after a person's first visit: MLflow's assistant panel (it opens itself on a local server) closed.
    b.open(f"{ui['base']}/#/experiments?{MODE}", "lora_lab")
    b.js('localStorage.setItem("mlflow.assistant.panelOpen_v1", "false")')
    b.js('localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true")')
    b.call("Page.reload")
    time.sleep(2)
    try:
        yield b
    finally:
        b.close()


def _keep(b: Browser, name: str, tmp_path: Path) -> None:
    png = tmp_path / f"mlflow_{name}.png"
    b.screenshot(png)
    assert png.stat().st_size > 10_000, name
    keep = os.environ.get("LORA_LAB_SCREENSHOTS")
    if keep:
        from PIL import Image

        Path(keep).mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").quantize(64).save(Path(keep) / png.name, optimize=True)


def test_browser_the_study_page_answers_above_the_fold(ui, browser, tmp_path):
    runs = by_name(ui)
    exp = ui["experiments"][0]["experiment_id"]
    m = metrics(runs["demo"])
    d = m["delta/loss_val_vs_full"]
    needles = [
        "Best: trial 0",  # the winner
        f"by {notes.human(abs(d))} nats/token val loss",  # its difference to full FT, with units
        f"{notes.percent(m['best/params_share'])} of full FT's",  # its trainable share
        "1 COMPLETE",  # the trials by state
        "lora.r=2 optim.lr=0.003",  # its settings, as the override line
    ]
    browser.open(f"{ui['base']}/#/experiments/{exp}/runs/{runs['demo']['info']['run_id']}?{MODE}", needles[0])
    seen = browser.js(f"{READABLE}({json.dumps(needles)})")
    for s in seen:
        assert s["found"] and s["inside"] and not s["clipped"] and s["faded"] <= 0.25, s
    assert "Show more" in browser.js("document.body.innerText")  # the rest is folded, as MLflow does
    _keep(browser, "study", tmp_path)


def test_browser_the_prepared_view_lists_the_studys_trials_best_first(ui, browser, tmp_path):
    exp = ui["experiments"][0]["experiment_id"]
    browser.open(f"{ui['base']}/{notes.view_url(exp, 'demo')}", "FAIL trial-1 · demo")
    rows = _table_rows(browser, "FAIL trial-1 · demo")
    names = [r["attributes.`Run Name`"].splitlines()[-1] for r in rows]
    trials = {n for n in by_name(ui) if n.endswith(" · demo") and "trial-" in n and "rerun" not in n}
    assert set(names) == trials  # the study's trials, nothing else
    assert names[0] == "trial-0 · demo"  # sorted by the objective: the COMPLETE one first
    state = {n: r["tags.`lora_lab.state`"] for n, r in zip(names, rows)}
    assert state["FAIL trial-1 · demo"] == "FAIL" and state["PRUNED trial-2 · demo"] == "PRUNED"  # told apart
    assert not any(r["name_cut"] for r in rows)  # names whole, state first
    fail = rows[names.index("FAIL trial-1 · demo")]
    assert fail["metrics.`objective/val_loss`"] == "-" and fail["metrics.`eval/accuracy`"] == "-"  # no base number
    assert {"params.`lora.r`", "params.`optim.lr`", "metrics.`params/trainable`"} <= set(fail)
    assert "Error loading shared view state" not in browser.js("document.body.innerText")
    _keep(browser, "runs_table", tmp_path)


def test_browser_runs_a_failed_trial_and_charts(ui, browser, tmp_path):
    runs = by_name(ui)
    exp = ui["experiments"][0]["experiment_id"]
    fail = runs["FAIL trial-1 · demo"]["info"]["run_id"]
    browser.open(f"{ui['base']}/#/experiments/{exp}/runs/{fail}?{MODE}", "No result")
    seen = browser.js(f"{READABLE}({json.dumps(['State: FAIL', 'No result: diverged'])})")
    assert all(s["found"] and s["inside"] and not s["clipped"] and s["faded"] <= 0.25 for s in seen), seen
    base = notes.human(metrics(runs["FAIL trial-1 · demo"])["base/loss_val"])
    shown = browser.js(f"{READABLE}({json.dumps([base])})")[0]  # in its folded results table, marked as the base's
    assert not (shown["found"] and shown["inside"] and not shown["clipped"] and shown["faded"] <= 0.25), shown
    _keep(browser, "run_fail", tmp_path)
    trial = runs["trial-0 · demo"]["info"]["run_id"]
    browser.open(f"{ui['base']}/#/experiments/{exp}/runs/{trial}?{MODE}", "Trial 0 of study")
    assert "nats/token" in browser.js("document.body.innerText")
    _keep(browser, "run_overview", tmp_path)
    browser.open(f"{ui['base']}/#/experiments/{exp}/runs/{trial}/model-metrics?{MODE}", "Add chart")
    sections = browser.js(
        "[...document.querySelectorAll('[data-testid=experiment-view-compare-runs-section-header]')]"
        ".map(e => e.textContent)"
    )
    assert [x for x in sections if x.startswith(("base", "loss"))] == ["base(2)Add chart", "loss(2)Add chart"]
    browser.js(  # charts draw as they come into view: show the loss curves
        "[...document.querySelectorAll('[data-testid=experiment-view-compare-runs-section-header]')]"
        ".find(e => e.textContent.startsWith('loss')).scrollIntoView()"
    )
    browser.wait("(loss/train)")
    browser.wait("(loss/val)")
    _keep(browser, "run_charts", tmp_path)
    browser.open(f"{ui['base']}/#/experiments/{exp}/runs?{MODE}", "FAIL broken")
    (seen,) = browser.js(f"{READABLE}({json.dumps(['Studies, each opening on its trials best first'])})")
    assert seen["found"] and seen["inside"] and not seen["clipped"], seen  # each study's view, one click away
    _keep(browser, "experiment", tmp_path)
