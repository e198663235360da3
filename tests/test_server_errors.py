"""Classification behind any OpenAI-compatible server or proxy: real error bodies of each server, every exception
the SDK can raise, and connection failures told apart from timeouts (next-phase-facts.md §7, qwen-vl-facts.md §4)."""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import socket
from typing import Any

import openai
import pytest

from qwenvl_batch.policy import (
    Action,
    InvalidResponseError,
    PartialResponseError,
    StreamCutError,
    classify,
    classify_status,
    error_fields,
    proxy_retries,
    retry_after,
)

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpx  # type: ignore[no-redef]

R, ROW, STOP = Action.RETRY, Action.ROW_ERROR, Action.STOP_JOB
_LITELLM_TAIL = "\n\nLiteLLM: model group 'm' failed with the error above. No fallback was attempted."

# (server, HTTP status, body as the server sends it, expected action, error_type, error code)
BODIES: list[tuple[str, int, dict[str, Any], Action, str, str | None]] = [
    ("dashscope", 429, {"error": {"message": "Requests rate limit exceeded, please try again later.",
                                  "type": "limit_requests", "param": None, "code": "limit_requests"},
                        "request_id": "abc"}, R, "rate_limit", "limit_requests"),
    ("dashscope", 400, {"error": {"message": "Input data may contain inappropriate content.",
                                  "type": "data_inspection_failed", "code": "data_inspection_failed"}},
     ROW, "content_filter", "data_inspection_failed"),
    ("dashscope", 400, {"error": {"message": "Access denied, please make sure your account is in good standing.",
                                  "type": "Arrearage", "code": "Arrearage"}}, STOP, "job", "Arrearage"),
    ("openai", 400, {"error": {"message": "Invalid content type. image_url is only supported by certain models.",
                               "type": "invalid_request_error", "param": "messages", "code": None}},
     STOP, "job", "model_not_multimodal"),
    ("openai", 429, {"error": {"message": "Rate limit reached for requests", "type": "requests", "param": None,
                               "code": "rate_limit_exceeded"}}, R, "rate_limit", "rate_limit_exceeded"),
    ("vllm<0.10.1", 400, {"object": "error", "message": "max_tokens must be at least 1, got 0.",
                          "type": "BadRequestError", "param": None, "code": 400}, ROW, "invalid_request",
     "BadRequestError"),
    ("vllm>=0.10.1", 400, {"error": {"message": "The model `qwen-nope` does not exist.", "type": "NotFoundError",
                                     "param": None, "code": 404}}, ROW, "invalid_request", "NotFoundError"),
    ("vllm>=0.10.1", 404, {"error": {"message": "The model `qwen-nope` does not exist.", "type": "NotFoundError",
                                     "param": None, "code": 404}}, STOP, "job", "NotFoundError"),
    ("vllm", 500, {"error": {"message": "Error in preprocessing prompt inputs", "type": "InternalServerError",
                             "param": None, "code": 500}}, ROW, "invalid_request", "server_rejected_input"),
    ("vllm", 500, {"error": {"message": "Internal Server Error", "type": "InternalServerError", "param": None,
                             "code": 500}}, R, "server", "InternalServerError"),
    ("sglang", 400, {"object": "error", "message": "Requested token count exceeds the model's maximum context",
                     "type": "BadRequestError", "param": None, "code": 400}, ROW, "invalid_request",
     "BadRequestError"),
    ("sglang", 503, {"object": "error", "message": "Service unavailable", "type": "ServiceUnavailable",
                     "param": None, "code": 503}, R, "server", "ServiceUnavailable"),
    ("llama-cpp-python", 400, {"error": {"message": "This model's maximum context length is 2048 tokens. However, "
                                                    "you requested 3022 tokens (3010 in the messages, 12 in the "
                                                    "completion).", "type": "invalid_request_error",
                                         "param": "messages", "code": "context_length_exceeded"}},
     ROW, "invalid_request", "context_length_exceeded"),
    ("llama-cpp-python", 500, {"error": {"message": "[{'type': 'int_parsing', 'loc': ('body', 'max_tokens'), 'msg': "
                                                    "'Input should be a valid integer', 'input': 'abc'}] File "
                                                    "\"/srv/llama_cpp/server/app.py\"", "type":
                                         "internal_server_error", "param": None, "code": None}},
     ROW, "invalid_request", "server_rejected_input"),
    ("llama-server", 500, {"error": {"code": 500, "message": "image input is not supported - hint: if this is "
                                                            "unexpected, you may need to provide the mmproj",
                                     "type": "server_error"}}, STOP, "job", "model_not_multimodal"),
    ("litellm", 429, {"error": {"message": "litellm.RateLimitError: RateLimitError: OpenAIException - Requests rate "
                                           "limit exceeded, please try again later." + _LITELLM_TAIL,
                                "type": "throttling_error", "param": None, "code": "429"}},
     R, "rate_limit", "throttling_error"),
    ("litellm", 400, {"error": {"message": "litellm.BadRequestError: OpenAIException - Access denied, please make "
                                           "sure your account is in good standing." + _LITELLM_TAIL,
                                "type": "invalid_request_error", "param": None, "code": "400"}},
     STOP, "job", "Arrearage"),
    ("litellm", 400, {"error": {"message": "litellm.BadRequestError: OpenAIException - Error code: 400 - {'error': "
                                           "{'code': 'Arrearage', 'message': 'Access denied.'}}" + _LITELLM_TAIL,
                                "type": "invalid_request_error", "param": None, "code": "400"}},
     STOP, "job", "Arrearage"),
    ("litellm", 400, {"error": {"message": "litellm.BadRequestError: OpenAIException - Error code: 400 - {'error': "
                                           "{'message': 'Input data may contain inappropriate content.', 'type': "
                                           "'data_inspection_failed', 'code': 'data_inspection_failed'}}"
                                           + _LITELLM_TAIL, "type": "invalid_request_error", "param": None,
                                "code": "400"}}, ROW, "content_filter", "data_inspection_failed"),
    ("litellm", 400, {"error": {"message": "litellm.BadRequestError: OpenAIException - Input data may contain "
                                           "inappropriate content." + _LITELLM_TAIL, "type": "invalid_request_error",
                                "param": None, "code": "400"}}, ROW, "content_filter", "data_inspection_failed"),
    # measured against LiteLLM 1.108.7 in front of the simulator (the upstream's code survives in `type`)
    ("litellm-1.108.7", 400, {"error": {"message": "litellm.BadRequestError: OpenAIException - Access denied, please "
                                                   "make sure your account is in good standing." + _LITELLM_TAIL,
                                        "type": "Arrearage", "param": None, "code": "400"}}, STOP, "job", "Arrearage"),
    ("litellm-1.108.7", 400, {"error": {"message": "litellm.BadRequestError: OpenAIException - Input data may "
                                                   "contain inappropriate content." + _LITELLM_TAIL,
                                        "type": "data_inspection_failed", "param": None, "code": "400"}},
     ROW, "content_filter", "data_inspection_failed"),
    ("litellm", 400, {"error": {"message": "/chat/completions: Invalid model name passed in model=no-such-model. "
                                           "Call `/v1/models` to view available models for your key.",
                                "type": "invalid_request_error", "param": "model", "code": "400"}},
     STOP, "job", "model_not_found"),
    ("litellm", 401, {"error": {"message": "Authentication Error, Invalid proxy server token passed. Received API "
                                           "Key = sk-...1234", "type": "auth_error", "param": "None", "code": "401"}},
     STOP, "job", "invalid_api_key"),
    ("litellm", 400, {"error": {"message": "litellm.BadRequestError: OpenAIException - <400> InternalError.Algo."
                                           "InvalidParameter: The image length and width do not meet the model "
                                           "restrictions. [height:1 or width:1 must be larger than 10]"
                                           + _LITELLM_TAIL, "type": "invalid_request_error", "param": None,
                                "code": "400"}}, ROW, "invalid_request", "invalid_request_error"),
    ("litellm", 500, {"error": {"message": "litellm.InternalServerError: InternalServerError: OpenAIException - An "
                                           "internal error has occured, please try again later." + _LITELLM_TAIL,
                                "type": "internal_server_error", "param": None, "code": "500"}},
     R, "server", "internal_server_error"),
]


def _sdk_error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> openai.APIStatusError:
    """The exception the SDK raises for this response (built by the SDK's own status-error factory)."""
    client = openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1")
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx.Response(status, request=request, headers=headers or {}, content=json.dumps(body).encode())
    return client._make_status_error_from_response(response)


@pytest.mark.parametrize(("server", "status", "body", "action", "error_type", "code"), BODIES,
                         ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(BODIES)])
def test_real_error_bodies(server: str, status: int, body: dict[str, Any], action: Action, error_type: str,
                           code: str | None) -> None:
    """Each server's real error body, raised by the SDK, maps to the action, error type and code in the table."""
    decision = classify(_sdk_error(status, body))
    assert (decision.action, decision.error_type, decision.code) == (action, error_type, code)
    if action is STOP:
        assert "—" in decision.message  # the stop message says what to fix
    inner = body.get("error", body)
    assert " ".join(str(inner["message"]).split()[:4]) in decision.message  # the real message is kept


def test_both_envelopes_give_the_same_fields() -> None:
    """The nested and the flat envelope give the same message; a numeric code (int or string) is not a code."""
    nested = error_fields({"error": {"message": "m", "type": "BadRequestError", "code": 400}})
    flat = error_fields({"object": "error", "message": "m", "type": "BadRequestError", "param": None, "code": "400"})
    assert nested == flat == {"code": "BadRequestError", "type": "BadRequestError", "message": "m"}
    assert error_fields({"error": {"message": "x"}}) == {"code": "", "type": "", "message": "x"}
    assert error_fields("not json", "fallback")["message"] == "fallback"


@pytest.mark.parametrize("fragment", ["Arrearage", "Access denied", "Incorrect API key provided",
                                      "Invalid model name passed in model=x",
                                      "The model `x` does not exist or you do not have access to it"])
@pytest.mark.parametrize("status", [400, 429, 500])
def test_stop_fragments_stop_wherever_they_appear(fragment: str, status: int) -> None:
    """Billing, key and model failures stop the job whatever status a proxy wrapped them in."""
    message = f"litellm.BadRequestError: OpenAIException - {fragment}.{_LITELLM_TAIL}"
    decision = classify_status(status, error_fields({"error": {"message": message, "code": str(status)}}), {})
    assert decision.action is STOP


def _instances(cls: type[BaseException]) -> list[BaseException]:
    """Instances of an SDK exception class, built from whatever its constructor takes."""
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx.Response(500, request=request, content=b"{}")
    candidates: dict[str, Any] = {"message": "boom", "request": request, "response": response, "body": None,
                                  "completion": None}
    parameters = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    args = [candidates.get(p.name, "x") for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD
            and p.default is p.empty]
    kwargs = {p.name: candidates.get(p.name, "x") for p in parameters if p.kind is p.KEYWORD_ONLY
              and p.default is p.empty}
    try:
        return [cls(*args, **kwargs)]
    except Exception:
        return [cls.__new__(cls)]


SDK_ERRORS = sorted({obj for module in (openai, openai._exceptions) for obj in list(vars(module).values())
                     if inspect.isclass(obj) and issubclass(obj, Exception)}, key=lambda c: c.__name__)


class _Nasty(Exception):
    def __str__(self) -> str:
        raise RuntimeError("even str() fails")


ARBITRARY: list[BaseException] = [
    RuntimeError("boom"), KeyError("choices"), AttributeError("'NoneType' object has no attribute 'delta'"),
    json.JSONDecodeError("Expecting value", "<html>", 0), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
    ValueError("x"), TypeError("y"), ZeroDivisionError(), TimeoutError(), TimeoutError(),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), OSError("disk"), _Nasty(),
    StreamCutError("cut"), InvalidResponseError("bad"), PartialResponseError("partial"), AssertionError(),
]


@pytest.mark.parametrize("exc", [e for cls in SDK_ERRORS for e in _instances(cls)] + ARBITRARY,
                         ids=lambda e: type(e).__name__)
def test_no_exception_escapes_the_classifier(exc: BaseException) -> None:
    """Every exception the SDK can raise, and arbitrary ones, become a decision: retried, recorded or a job stop."""
    decision = classify(exc)
    assert decision.action in (R, ROW, STOP)
    assert decision.error_type and decision.reason


def test_unknown_exception_is_retried_once_then_recorded() -> None:
    """An exception nobody expected gets one more try, then its row records its type and message."""
    decision = classify(KeyError("choices"))
    assert (decision.action, decision.error_type, decision.max_attempts) == (R, "client", 2)
    assert "KeyError" in decision.message and "choices" in decision.message


def test_stream_error_event_keeps_its_real_message() -> None:
    """An error event inside a 200 stream (openai.APIError without status) is judged by its real message."""
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    moderation = openai.APIError("Output data may contain inappropriate content.", request,
                                 body={"message": "Output data may contain inappropriate content.",
                                       "code": "data_inspection_failed"})
    decision = classify(moderation)
    assert (decision.action, decision.error_type, decision.code) == (ROW, "content_filter", "data_inspection_failed")
    cut = openai.APIError("litellm.APIConnectionError: upstream closed", request,
                          body={"message": "litellm.APIConnectionError: upstream closed", "code": "500"})
    decision = classify(cut)
    assert decision.action is R and "upstream closed" in decision.message and "stream" in decision.message
    billing = openai.APIError("x", request, body={"message": "Arrearage: Access denied.", "code": "400"})
    assert classify(billing).action is STOP


# -- connections ------------------------------------------------------------------------------------------

def _wrapped(cause: BaseException, outer: type[openai.APIConnectionError] = openai.APIConnectionError,
             host: str = "gpu-box.internal", port: int = 8000) -> openai.APIConnectionError:
    request = httpx.Request("POST", f"http://{host}:{port}/v1/chat/completions")
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer(request=request) from inner
    except openai.APIConnectionError as exc:
        return exc


CONNECT_FAILURES = [
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"), "Connection refused"),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "DNS lookup failed"),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "No route to host"),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), "Network is unreachable"),
]


@pytest.mark.parametrize(("cause", "text"), CONNECT_FAILURES, ids=lambda v: getattr(v, "strerror", v))
@pytest.mark.parametrize("outer", [openai.APIConnectionError, openai.APITimeoutError])
def test_connect_failures_are_connection_errors_with_the_real_cause(cause: OSError, text: str,
                                                                    outer: type[openai.APIConnectionError]) -> None:
    """Refused, DNS and unreachable are `connection` with host:port and the OS error, even when the SDK's aiohttp
    transport wraps them in a timeout error."""
    decision = classify(_wrapped(cause, outer))
    assert (decision.error_type, decision.connect_failed) == ("connection", True)
    assert "gpu-box.internal:8000" in decision.message and text in decision.message
    assert "timed out" not in decision.message


def test_real_timeout_stays_a_timeout() -> None:
    """A request that was sent but not answered in time is a `timeout`, not a connect failure."""
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    decision = classify(openai.APITimeoutError(request=request))
    assert (decision.error_type, decision.connect_failed) == ("timeout", False)
    read_timeout = _wrapped(httpx.ReadTimeout("read timed out"), openai.APITimeoutError)
    assert classify(read_timeout).error_type == "timeout"


def test_connection_refused_by_a_real_closed_port() -> None:
    """A real refused connection on loopback, through the SDK, is `connection` naming 127.0.0.1:PORT."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def attempt() -> BaseException:
        client = openai.AsyncOpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except Exception as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("a closed port answered")

    decision = classify(asyncio.run(attempt()))
    assert decision.connect_failed and f"127.0.0.1:{port}" in decision.message
    assert "refused" in decision.message.lower()


# -- proxy headers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "expected"), [
    ({"llm_provider-retry-after": "2"}, 2.0),
    ({"llm_provider-retry-after-ms": "1500"}, 1.5),
    ({"retry-after": "3", "llm_provider-retry-after": "9"}, 3.0),
    ({"x-ratelimit-remaining-requests": "0"}, None),
])
def test_retry_after_read_behind_a_litellm_proxy(headers: dict[str, str], expected: float | None) -> None:
    """The upstream's Retry-After, as a LiteLLM proxy forwards it (llm_provider-*), is honoured."""
    assert retry_after(headers) == expected


def test_proxy_hidden_retries_are_read() -> None:
    """x-litellm-attempted-retries says how many upstream attempts the proxy made on its own."""
    assert proxy_retries({"x-litellm-attempted-retries": "2"}) == 2
    assert proxy_retries({}) == 0 and proxy_retries({"x-litellm-attempted-retries": "n/a"}) == 0
    decision = classify(_sdk_error(429, {"error": {"message": "slow", "code": "429"}},
                                   {"x-litellm-attempted-retries": "2", "llm_provider-retry-after": "4"}))
    assert (decision.proxy_retries, decision.retry_after_s) == (2, 4.0)


def test_litellm_unknown_key_without_a_database_stops() -> None:
    """LiteLLM 1.108.7 answers a key other than its master key, when it has no database, with 400 "No connected
    db." (measured): the job stops with the key hint instead of erroring every row."""
    decision = classify(_sdk_error(400, {"error": {"message": "No connected db.", "type": "no_db_connection",
                                                   "param": None, "code": "400"}}))
    assert decision.action is STOP and "proxy's own key" in decision.message


def test_200_with_an_error_body_is_judged_as_that_error(tmp_path: Any) -> None:
    """A proxy answering 200 with an error envelope gives that error's verdict (here a billing stop), not an
    "invalid response" retried until the row fails."""
    from qwenvl_batch.client import ChatClient
    from qwenvl_batch.config import job_from_dict

    body = {"error": {"message": "Access denied, please make sure your account is in good standing.",
                      "type": "Arrearage", "code": "400"}}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    job = job_from_dict({"input": {"path": "m.csv", "id_column": "id", "image_columns": ["image"]},
                         "output": {"path": "out"},
                         "model": {"name": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_optional": True},
                         "prompt": {"user": "hi"}}, base_dir=tmp_path)

    async def attempt() -> BaseException:
        client = ChatClient(job, api_key="x")
        client._client = openai.AsyncOpenAI(api_key="x", base_url="http://127.0.0.1:9/v1", max_retries=0,
                                            http_client=httpx.AsyncClient(transport=transport))
        try:
            await client.complete([{"role": "user", "content": "hi"}])
        except Exception as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("an error body was taken for an answer")

    decision = classify(asyncio.run(attempt()))
    assert (decision.action, decision.code) == (STOP, "Arrearage")
