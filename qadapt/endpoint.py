"""A client of an OpenAI-compatible chat-completions server (llama.cpp, Ollama, vLLM, a hosted API).

Standard library only. The API key is read from an environment variable by the caller and is sent in the
Authorization header, never logged or written. Overload (429) and server errors (5xx) and timeouts are
retried with exponential backoff (honouring Retry-After); a server that cannot be reached at all is a
clear error at once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from qadapt.errors import QadaptError

RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8080/v1
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubled each time, at most 30

    def __post_init__(self):
        self.base_url = self.base_url.rstrip("/")

    def models(self) -> list[str]:
        """The model ids the server lists (GET /models)."""
        return [entry["id"] for entry in self._call("GET", "/models").get("data", [])]

    def chat(self, payload: dict) -> str:
        """The first choice's message text of a chat completion (POST /chat/completions)."""
        body = self._call("POST", "/chat/completions", payload)
        try:
            return body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise QadaptError(f"{self.base_url}/chat/completions answered without a message: "
                              f"{json.dumps(body)[:200]}") from None

    def _call(self, method: str, path: str, payload: dict | None = None) -> dict:
        url = self.base_url + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode() if payload is not None else None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode("utf-8", "replace")
                if error.code not in RETRIED_STATUS or attempt == self.retries:
                    raise QadaptError(f"{method} {url}: HTTP {error.code} {error.reason}: {detail}") from None
                self._wait(attempt, error.headers.get("Retry-After"))
            except (TimeoutError, urllib.error.URLError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                timed_out = isinstance(error, TimeoutError) or isinstance(reason, TimeoutError)
                if not timed_out:
                    raise QadaptError(f"cannot reach the teacher at {self.base_url} ({reason}); is the server "
                                      "running, and is the address right (e.g. http://127.0.0.1:8080/v1)?") from None
                if attempt == self.retries:
                    raise QadaptError(f"{method} {url}: no answer within {self.timeout:g} s, "
                                      f"{self.retries + 1} times") from None
                self._wait(attempt, None)
            except json.JSONDecodeError:
                raise QadaptError(f"{method} {url}: the answer is not JSON") from None
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = min(30.0, self.backoff * 2 ** attempt)
        if retry_after:
            try:
                delay = min(60.0, float(retry_after))
            except ValueError:
                pass
        time.sleep(delay)
