"""What a finished request leaves behind: Prometheus metrics and one usage record, numbers only; and, for
a deployment that opted in, its text in the deployment's own request log (and nowhere else)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ember.runtime.serving.call import Call
from ember.runtime.serving.replica import Replica


@dataclass(frozen=True)
class Accounting:
    replica: Replica
    account: str
    model: str
    started: float  # time.perf_counter() when the request arrived
    response_id: str = ""
    user: str = ""
    logged_prompt: object = None  # the prompt, kept only when the deployment has a request log

    def __call__(self, call: Call, status: str) -> None:
        latency = time.perf_counter() - self.started
        prompt_tokens = call.prompt_tokens
        metrics = self.replica.metrics
        metrics.requests.labels(self.model, status).inc()
        metrics.tokens.labels(self.model, "prompt").inc(prompt_tokens)
        metrics.tokens.labels(self.model, "completion").inc(call.completion_tokens)
        metrics.latency.labels(self.model).observe(latency)
        if call.first_token is not None:
            metrics.ttft.labels(self.model).observe(call.first_token - self.started)
            if call.completion_tokens > 1:
                decode = time.perf_counter() - call.first_token
                metrics.time_per_output_token.labels(self.model).observe(decode / (call.completion_tokens - 1))
        for reason in call.finish_reasons:
            metrics.finished.labels(self.model, reason).inc()
        self.replica.meter.record(self.account, self.model, prompt_tokens, call.completion_tokens, latency, status,
                                  self.response_id, self.user)
        if self.replica.request_log and status == "ok":
            for text in call.texts:
                self.replica.request_log.write(self.account, self.model, self.logged_prompt, text)
