"""`qadapt rationales`: sampled solutions from a teacher, kept when right, resumable; from a model qadapt
loads and from an OpenAI-compatible endpoint (a server on 127.0.0.1 answering with qadapt's own decoding)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import qadapt
from qadapt.data import load_examples
from qadapt.decoding.sampling import Sampling
from qadapt.errors import QadaptError
from qadapt.inference.rationales import EndpointOptions, Problem, distinct, is_right, read_problems, run_rationales
from qadapt.tasks import answers

REPO = Path(__file__).resolve().parents[1]
SUMS = [(a, b) for a in (2, 4, 6, 3) for b in (3, 5, 1)]  # sums the embedded model sometimes gets right


def sums_file(folder: Path) -> Path:
    rows = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} + {b} = {a + b}",
             "answer": str(a + b)} for a, b in SUMS]
    path = folder / "sums.json"
    path.write_text(json.dumps(rows))
    return path


def test_repeats_are_dropped_and_a_letter_is_read_after_the_answer_is():
    texts = ["3 + 4 = 7. The answer is 7.", "3 + 4 = 7.  The answer is 7.", "3+4 = 7. The answer is 7!",
             "Three and four make 7. The answer is 7."]
    assert distinct(texts) == [texts[0], texts[3]]
    letter = Problem("aqua:0", 0, "aqua", {"instruction": "?", "input": ""}, "C", True)
    assert is_right("Adding them gives 12. The answer is (C).", letter)
    assert not is_right("A train leaves at noon. The answer is (D).", letter)  # not the paper's first capital


def check_kept(out: Path, data: Path) -> list[dict]:
    """Every kept rationale's answer, read as the evaluation reads it, is its problem's gold answer."""
    golds = {r["instruction"]: float(r["answer"]) for r in json.loads(data.read_text())}
    kept = json.loads(out.read_text())
    for row in kept:
        assert set(row) == {"instruction", "input", "output", "answer"}
        assert answers.is_correct(answers.extract_number(row["output"]), golds[row["instruction"]])
        assert float(row["answer"]) == golds[row["instruction"]]
    return kept


def samples_by_key(out: Path) -> dict:
    lines = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    return {line["key"]: line["samples"] for line in lines[1:]}


@pytest.mark.slow
def test_rationales_from_a_model_are_right_resume_after_a_kill_and_train(tmp_path):
    data = sums_file(tmp_path)
    args = ["--teacher", "smollm2-135m", "--template", "chat", "--data", str(data), "--samples", "4",
            "--max-new-tokens", "40", "--batch-size", "8", "--temperature", "0.8", "--seed", "5"]
    whole = tmp_path / "whole.json"
    result = qadapt("rationales", *args, "--out", str(whole))
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(whole.with_suffix(".stats.json").read_text())
    kept = check_kept(whole, data)
    assert stats["problems"] == len(SUMS) and stats["samples"] == 4 * len(SUMS)
    assert 1 <= stats["rationales_kept"] == len(kept) <= stats["pass@1"] * stats["samples"]
    assert stats["pass@k"] == stats["solved_at_least_once"] / len(SUMS)
    assert f"{stats['rationales_kept']} rationales kept" in result.stdout

    # Killed once its first chunk (8 problems) is written, then run again: the rest is asked, nothing twice,
    # and every problem has the samples the uninterrupted run drew.
    stopped = tmp_path / "stopped.json"
    process = subprocess.Popen([sys.executable, "-m", "qadapt", "rationales", *args, "--out", str(stopped)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples_file = stopped.with_suffix(".samples.jsonl")
    while process.poll() is None and not (samples_file.is_file() and len(samples_file.read_text().splitlines()) > 1):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    asked_first = len(samples_by_key(stopped))
    assert 0 < asked_first < len(SUMS) and not stopped.exists()
    resumed = qadapt("rationales", *args, "--out", str(stopped))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(stopped.with_suffix(".stats.json").read_text())["asked_this_call"] == len(SUMS) - asked_first
    assert samples_by_key(stopped) == samples_by_key(whole)
    assert json.loads(stopped.read_text()) == kept

    # The same samples as preference pairs (--out with the same stem: nothing is asked again).
    pairs_out = tmp_path / "stopped.jsonl"
    paired = qadapt("rationales", *args, "--out", str(pairs_out), "--pairs")
    assert paired.returncode == 0, paired.stderr[-2000:]
    pairs_stats = json.loads(pairs_out.with_suffix(".stats.json").read_text())
    assert pairs_stats["asked_this_call"] == 0 and f"{pairs_stats['pairs']} preference pairs" in paired.stdout
    pairs = load_examples(str(pairs_out))
    lines = [json.loads(line) for line in stopped.with_suffix(".samples.jsonl").read_text().splitlines()[1:]]
    mixed = sum(any(line["right"]) and not all(line["right"]) for line in lines)  # a right and a wrong answer
    assert len(pairs) == pairs_stats["pairs"] == mixed >= 1
    problems = {problem.record["instruction"]: problem for problem in read_problems([str(data)])}
    for pair in pairs:
        problem = problems[pair["chosen"]["instruction"]]
        assert is_right(pair["chosen"]["output"], problem) and not is_right(pair["rejected"]["output"], problem)

    changed = qadapt("rationales", *args[:-2], "--seed", "6", "--out", str(stopped))
    assert changed.returncode == 2 and "made with other settings (seed: 5 then, 6 now)" in changed.stderr


class _OpenAIServer(ThreadingHTTPServer):
    """/v1/models and /v1/chat/completions, answered by qadapt's decoder on the embedded model; the first
    completion is refused with 429 (a client must retry); every request must carry the API key."""

    def __init__(self, loaded, key: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.loaded, self.key, self.lock, self.requests = loaded, key, threading.Lock(), []


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._reply(200, {"object": "list", "data": [{"id": "smollm2-135m", "object": "model"}]})

    def do_POST(self):
        from qadapt.inference.answering import answer_conversation

        server = self.server
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != f"Bearer {server.key}":
            return self._reply(401, {"error": "bad key"})
        with server.lock:
            server.requests.append(payload)
            first = len(server.requests) == 1
        if first:
            return self._reply(429, {"error": "slow down"}, {"Retry-After": "0.1"})
        m = server.loaded
        sampling = Sampling(payload["temperature"], payload["top_p"], seed=payload["seed"])
        with server.lock:  # one decoder at a time
            text = answer_conversation(m.model, m.tokenizer, m.template, payload["messages"], payload["max_tokens"],
                                       sampling)
        self._reply(200, {"object": "chat.completion", "model": payload["model"],
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}]})


@pytest.mark.slow
def test_rationales_from_an_openai_compatible_endpoint(tmp_path, monkeypatch):
    from qadapt.inference.loader import load_target

    data = sums_file(tmp_path)
    server = _OpenAIServer(load_target("smollm2-135m", template="chat"), key="sk-test-secret")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("QADAPT_TEST_KEY", "sk-test-secret")
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    out = tmp_path / "endpoint.json"
    try:
        stats = run_rationales(url, [str(data)], out, Sampling(0.8, samples=2, seed=1), limit=6, max_new_tokens=32,
                               endpoint=EndpointOptions(api_key_env="QADAPT_TEST_KEY", concurrency=3, timeout=60))
    finally:
        server.shutdown()
    assert len(server.requests) == 6 * 2 + 1  # one request per sample, and the refused one again
    assert {r["model"] for r in server.requests} == {"smollm2-135m"}  # the first model the server lists
    assert len({r["seed"] for r in server.requests}) == 12
    assert stats["problems"] == 6 and stats["samples"] == 12
    check_kept(out, data)
    for written in tmp_path.glob("endpoint*"):
        assert "sk-test-secret" not in written.read_text()
    problems = read_problems([str(data)], limit=1)
    assert problems[0].key == "sums:0"

    with pytest.raises(QadaptError, match="cannot reach the teacher at http://127.0.0.1:9/v1"):
        run_rationales("http://127.0.0.1:9/v1", [str(data)], tmp_path / "none.json", Sampling(samples=1), limit=1,
                       endpoint=EndpointOptions(model="m"))
