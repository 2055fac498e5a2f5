"""api.access_log: signed links never reach the access log (issue 11, item 4)."""

from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid

import httpx
from service_stack import cli_argv, free_port, stop_process

from api.access_log import REDACTED, RedactSignedLinks, redact


def test_redact_hides_every_signature_parameter_and_keeps_the_rest() -> None:
    path = "/api/v1/artifacts/abc/model.safetensors?expires=1796000000&sig=deadbeef"
    assert redact(path) == f"/api/v1/artifacts/abc/model.safetensors?expires=1796000000&sig={REDACTED}"
    s3 = "/b/k?X-Amz-Credential=AKIA%2F1&X-Amz-Date=1&X-Amz-Signature=00ff&X-Amz-Security-Token=t"
    assert "AKIA" not in redact(s3) and "00ff" not in redact(s3) and "X-Amz-Date=1" in redact(s3)
    assert redact("/api/v1/jobs?limit=5") == "/api/v1/jobs?limit=5"


def test_the_filter_rewrites_uvicorn_style_records() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", "/x?sig=secret", "1.1", 200), None)
    assert RedactSignedLinks().filter(record)
    assert "secret" not in record.getMessage() and REDACTED in record.getMessage()


def test_a_real_api_process_logs_no_signature(redis_url: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APP_")}
    env.update(REDIS_URL=redis_url, APP_REDIS_PREFIX=f"test-{uuid.uuid4().hex[:12]}", APP_SIGNING_SECRET="s3cret")
    proc = subprocess.Popen(cli_argv("api", "--port", str(port)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60  # hang guard
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        link = f"{url}/api/v1/artifacts/{uuid.uuid4().hex}/model.safetensors?expires=4102444800&sig=topsecret123"
        assert httpx.get(link, timeout=10).status_code in (403, 404)
    finally:
        stop_process(proc)
    assert proc.stdout is not None
    log = proc.stdout.read()
    proc.stdout.close()
    assert "/api/v1/artifacts/" in log, log  # the request was logged...
    assert "topsecret123" not in log and f"sig={REDACTED}" in log  # ...without its signature
