"""qadapt studio's API: runs and their states, live metrics, the recipe form's schema and checks, starting,
stopping and resuming real training processes, and its safety rules (loopback, token, paths, 4xx)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import write_tiny_recipe

from qadapt.recipe_schema import recipe_keys
from qadapt.studio.server import Studio, make_server


class Client:
    """Requests to a studio, answered as (status, JSON)."""

    def __init__(self, base: str, headers: dict | None = None):
        self.base, self.headers = base, headers or {}

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict]:
        return self._send(urllib.request.Request(self.base + path, headers={**self.headers, **(headers or {})}))

    def post(self, path: str, body=None, content_type: str = "application/json", raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        return self._send(urllib.request.Request(self.base + path, data=data,
                                                 headers={**self.headers, "Content-Type": content_type}))

    def _send(self, request) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
                return response.status, json.loads(text) if "json" in response.headers["Content-Type"] else text
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


def serve(studio: Studio, host: str = "127.0.0.1"):
    server = make_server(studio, host, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_port}"


@pytest.fixture
def studio(tmp_path, tiny_llama_dir):
    """A studio over an empty runs folder, with one tiny recipe (the real quantized path) to start from."""
    (tmp_path / "recipes").mkdir()
    write_tiny_recipe(tmp_path / "recipes" / "tiny.yaml", tiny_llama_dir,
                      train={"max_steps": 40, "save_every": 10, "eval_every": 0, "log_every": 1})
    (tmp_path / "recipes" / "not-a-recipe.yaml").write_text("compute_environment: LOCAL_MACHINE\n")
    studio = Studio(tmp_path / "runs", tmp_path / "recipes", cwd=tmp_path)
    (tmp_path / "runs").mkdir()
    server, base = serve(studio)
    yield studio, Client(base)
    server.shutdown()
    for process in studio.processes.running:
        process.kill()
        process.wait()


def wait_for(condition, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout} s")


def run_row(client: Client, name: str) -> dict | None:
    return next((run for run in client.get("/api/runs")[1] if run["name"] == name), None)


def test_the_form_is_the_recipe_schema_and_checks_are_the_recipe_loaders(studio):
    studio, client = studio
    status, recipes = client.get("/api/recipes")
    assert status == 200 and [r["id"] for r in recipes] == ["shipped:tiny.yaml"]  # the accelerate-like file left out
    schema = client.get("/api/schema")[1]
    assert [key["key"] for key in schema["keys"]] == [key["key"] for key in recipe_keys()]
    optimizer = next(key for key in schema["keys"] if key["key"] == "train.optimizer")
    assert optimizer["type"] == "choice" and "paged_adamw_8bit" in optimizer["choices"]
    assert set(schema["locked"]) == {"model.trust_remote_code", "output_dir"}
    values = client.get("/api/recipe?id=shipped:tiny.yaml")[1]["values"]
    assert values["train.max_steps"] == 40 and values["model.quant"] == "nf4"

    status, checked = client.post("/api/check", {"recipe": "shipped:tiny.yaml",
                                                 "overrides": {"train.lr": "fast", "adapter.rank": "0",
                                                               "model.quantt": "nf4"}})
    assert status == 200 and checked["plan"] is None
    by_key = {problem["key"]: problem["message"] for problem in checked["problems"]}
    assert by_key["train.lr"] == "train.lr: expected a finite number, got 'fast'"
    assert by_key["adapter.rank"] == "adapter.rank must be at least 1"
    assert "did you mean 'model.quant'" in by_key["model.quantt"]

    fits = client.post("/api/check", {"recipe": "shipped:tiny.yaml", "overrides": {}, "gpu_memory": 24})[1]
    assert fits["problems"] == [] and fits["plan"]["fits"] and fits["plan"]["needed_gib"] > 0
    tight = client.post("/api/check", {"recipe": "shipped:tiny.yaml", "overrides": {}, "gpu_memory": 0.01})[1]
    assert not tight["plan"]["fits"]


def test_requests_that_lead_outside_or_are_malformed_get_a_4xx_and_a_line(studio, tmp_path):
    studio, client = studio
    (tmp_path / "outside").mkdir()
    write_tiny_recipe(tmp_path / "outside" / "recipe.yaml", "model")  # a run-like folder beside runs/
    refused = [
        (client.get("/api/runs/../outside/metrics"), 403, "outside"),
        (client.get("/api/runs/%2e%2e%2foutside"), 403, "outside"),
        (client.get("/api/runs/nothing/metrics"), 404, "no run 'nothing'"),
        (client.get("/api/recipe?id=shipped:../outside/recipe.yaml"), 403, "outside"),
        (client.get("/api/recipe?id=/etc/passwd"), 400, "is not shipped:NAME.yaml or run:NAME"),
        (client.get("/static/../server.py"), 404, "no such file"),
        (client.get("/api/runs/x/metrics?after=-1"), 400, "after must be a row count"),
        (client.get("/api/nowhere"), 404, "no such address"),
        (client.get("/api/start"), 405, "GET is not how /api/start is used"),
        (client.post("/api/check", {"recipe": "shipped:tiny.yaml"}, content_type="text/plain"), 415, "send JSON"),
        (client.post("/api/check", raw=b"{not json"), 400, "the body is not JSON"),
        (client.post("/api/check", [1, 2]), 400, "the body must be a JSON object"),
        (client.post("/api/check", {}), 400, "the request needs 'recipe'"),
        (client.post("/api/check", {"recipe": 3}), 400, "'recipe' must be a str, got int"),
        (client.post("/api/check", {"recipe": "shipped:tiny.yaml", "overrides": {"model.trust_remote_code": "true"}}),
         403, "model.trust_remote_code is set in the recipe file itself"),
        (client.post("/api/start", {"recipe": "shipped:tiny.yaml", "name": "../escape"}), 400, "run name"),
        (client.post("/api/start", {"recipe": "shipped:tiny.yaml", "name": "bad", "overrides": {"train.lr": "x"}}),
         422, "train.lr: expected a finite number"),
        (client.get("/", headers={"Host": "attacker.example:80"}), 403, "answers requests to 127.0.0.1 or localhost"),
    ]
    for (status, answer), expected_status, expected in refused:
        assert status == expected_status and expected in answer["error"], (status, answer)
        assert "Traceback" not in answer["error"]
    assert not (tmp_path / "escape").exists() and list((tmp_path / "runs").iterdir()) == []


def test_another_address_needs_the_token_once_then_a_cookie(tmp_path):
    studio = Studio(tmp_path, token="s3cret")
    server, base = serve(studio, "0.0.0.0")
    try:
        local = base.replace("0.0.0.0", "127.0.0.1")
        status, answer = Client(local).get("/api/runs")
        assert status == 401 and "needs its token" in answer["error"]
        assert Client(local, {"X-Studio-Token": "wrong"}).get("/api/runs")[0] == 401
        assert Client(local, {"X-Studio-Token": "s3cret"}).get("/api/runs") == (200, [])
        with urllib.request.urlopen(local + "/?token=s3cret") as response:
            cookie = response.headers["Set-Cookie"]
        assert cookie.startswith("qadapt_studio=s3cret;") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert Client(local, {"Cookie": "qadapt_studio=s3cret"}).get("/api/runs") == (200, [])
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_run_started_from_the_page_is_watched_stopped_and_resumed(studio, tmp_path):
    """A real `qadapt train` process of its own: two clients see the same points as the log grows; stop
    (SIGTERM) saves a checkpoint; resume continues it to the end; the report table shows it."""
    studio, client = studio
    status, started = client.post("/api/start", {"recipe": "shipped:tiny.yaml", "name": "first",
                                                 "overrides": {"train.lr": "1e-3"}})
    assert status == 200 and started["name"] == "first"
    assert client.post("/api/start", {"recipe": "shipped:tiny.yaml", "name": "first"})[0] == 409

    wait_for(lambda: (run_row(client, "first") or {}).get("step", 0) >= 3, "third step")
    watcher = Client(client.base)
    first = client.get("/api/runs/first/metrics?after=0")[1]
    second = watcher.get("/api/runs/first/metrics?after=0")[1]
    shared = min(first["next"], second["next"])
    assert shared >= 3 and first["rows"][:shared] == second["rows"][:shared]
    more = client.get(f"/api/runs/first/metrics?after={first['next']}")[1]
    assert more["next"] >= first["next"] and more["rows"] == watcher.get(
        f"/api/runs/first/metrics?after={first['next']}")[1]["rows"][:len(more["rows"])]
    row = run_row(client, "first")
    assert row["state"] == "training" and row["max_steps"] == 40 and row["task"] == "causal-lm"
    assert client.post("/api/runs/first/resume")[0] == 409  # still training

    assert client.post("/api/runs/first/stop")[0] == 200
    stopped = wait_for(lambda: (r := run_row(client, "first"))["state"] == "interrupted" and r, "interrupted state")
    assert stopped["message"].startswith("stopped by SIGTERM after step")
    assert client.post("/api/runs/first/stop")[0] == 409
    recipe = (tmp_path / "runs" / "first" / "recipe.yaml").read_text()
    assert "lr: 0.001" in recipe and f"output_dir: {tmp_path / 'runs' / 'first'}" in recipe

    assert client.post("/api/runs/first/resume")[0] == 200
    finished = wait_for(lambda: (r := run_row(client, "first"))["state"] == "finished" and r, "finished state")
    assert finished["step"] == finished["max_steps"] == 40
    rows = client.get("/api/runs/first/metrics")[1]["rows"]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 41))  # resumed: every step once
    console = client.get("/api/runs/first/console")[1]["text"]
    assert "$ qadapt train" in console and "SIGTERM received" in console and "resume: continuing from" in console
    report = client.get("/api/report?run=first")[1]
    assert "| first |" in report["table"] and report["left_out"] == []

    # The finished run, from its other pages: chat (base and adapter on one loaded base), evaluate, export.
    status, chat = client.post("/api/chat", {"prompt": "What is 2 plus 3?", "runs": ["first"], "max_new_tokens": 8})
    assert status == 200 and [a["name"] for a in chat["answers"]] == ["base", "first"]
    alone, with_adapter = answers_alone(tmp_path / "runs" / "first", "What is 2 plus 3?", 8)
    assert [a["text"] for a in chat["answers"]] == [alone, with_adapter]
    assert client.post("/api/chat", {"prompt": "hi", "runs": ["nothing"]})[0] == 404

    status, job = client.post("/api/runs/first/eval", {"sets": ["builtin:arithmetic"], "limit": 4})
    assert status == 200 and job["kind"] == "eval" and job["state"] == "running"
    exported = client.post("/api/runs/first/export", {"format": "peft"})[1]
    for started in (job, exported):
        done = wait_for(lambda: ended_job(client, started["id"]), f"end of {started['id']}")
        assert done["state"] == "done", done["log"]
    assert run_row(client, "first")["scores"]["arithmetic"]["total"] == 4
    assert (tmp_path / "runs" / "first" / "exports" / "peft" / "adapter_model.safetensors").is_file()
    assert client.post("/api/runs/first/export", {"format": "onnx"})[1]["error"].startswith("format 'onnx' is not")


def ended_job(client: Client, job_id: str) -> dict | None:
    job = next(j for j in client.get("/api/jobs")[1] if j["id"] == job_id)
    return None if job["state"] == "running" else job


def answers_alone(run: Path, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    """The run's greedy answer loaded on its own (qadapt generate's path), and its base's alone."""
    from qadapt.adapters import adapters_off
    from qadapt.inference.answering import answer_prompts
    from qadapt.inference.loader import load_trained_model

    model, tokenizer, recipe = load_trained_model(run)
    with adapters_off(model):
        base = answer_prompts(model, tokenizer, recipe.data.template, [prompt], max_new_tokens)[0]
    return base, answer_prompts(model, tokenizer, recipe.data.template, [prompt], max_new_tokens)[0]
