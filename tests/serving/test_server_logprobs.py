"""logprobs, echo, n and best_of through the real `openai` client, streamed and not, with exact usage.

The shape tests run on the builtin server and (marked `vllm`) on vLLM's CPU build, so the shapes are
vLLM's own; tests of what vLLM does not do (best_of, streamed echo with n > 1: vLLM 0.32 fails those)
run on the builtin server only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from serving.config import DeploymentConfig
from serving.launch import ServerProcess
from tests.serving.test_backend_contract import VLLM_STARTUP_TIMEOUT_S, vllm_deployment

MODEL = "llama-tiny"
PROMPT = "The quick brown fox jumps over the lazy dog"
NO_EOS = {"ignore_eos": True}


@pytest.fixture(
    scope="module",
    params=["builtin", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])],
)
def server(
    request: pytest.FixtureRequest,
    make_config: Callable[..., DeploymentConfig],
    startup_timeout: float,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp(f"logprobs-{request.param}") / "server.log"
    if request.param == "builtin":
        config, timeout = make_config(), startup_timeout
    else:
        named = {"model.served_model_name": MODEL}  # llama-57m: vLLM's CPU attention has no head size 16
        config = vllm_deployment().replace(engine_args="--enforce-eager", **named)
        timeout = VLLM_STARTUP_TIMEOUT_S
    proc = ServerProcess(config, log_path=log_path)
    proc.start()
    try:
        proc.wait_healthy(timeout)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def builtin(server: ServerProcess, client: openai.OpenAI) -> openai.OpenAI:
    if server.config.backend != "builtin":
        pytest.skip("vLLM 0.32 does not implement this")
    return client


def prompt_len(server: ServerProcess, prompt: str = PROMPT) -> int:
    reply = httpx.post(server.url + "/tokenize", json={"prompt": prompt}, timeout=30)
    reply.raise_for_status()
    return int(reply.json()["count"])


def check_completion_logprobs(lp: Any, count: int, num_top: int) -> None:
    """Parallel lists of `count` positions; offsets count the token strings; the chosen token in top."""
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == count
    for i in range(1, count):
        assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        if logprob is None:  # an echoed prompt's first token
            assert top is None
            continue
        assert logprob <= 0.0
        assert top[token] == pytest.approx(logprob)
        assert 1 <= len(top) <= num_top + 1


def test_completion_logprobs_greedy(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, extra_body=NO_EOS
    )
    choice = result.choices[0]
    assert result.usage is not None and result.usage.completion_tokens == 6
    assert choice.logprobs is not None
    check_completion_logprobs(choice.logprobs, 6, 3)
    for logprob, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, strict=True):
        assert logprob == pytest.approx(max(top.values()), abs=1e-5), "greedy picks the most likely token"


def test_completion_logprobs_zero_gives_only_the_chosen_token(client: openai.OpenAI) -> None:
    choice = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0, extra_body=NO_EOS
    ).choices[0]
    assert choice.logprobs is not None
    check_completion_logprobs(choice.logprobs, 3, 0)
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs or [])


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, server: ServerProcess) -> None:
    """What evaluation harnesses send for a log-likelihood: echo, logprobs, one output token."""
    n_prompt = prompt_len(server)
    result = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1, echo=True, extra_body=NO_EOS
    )
    choice = result.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    assert result.usage is not None and result.usage.prompt_tokens == n_prompt
    assert choice.logprobs is not None
    check_completion_logprobs(choice.logprobs, n_prompt + 1, 1)
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.token_logprobs[0] is None
    assert all(lp is not None for lp in choice.logprobs.token_logprobs[1:])
    extra = choice.model_extra or {}
    assert len(extra["prompt_logprobs"]) == n_prompt and extra["prompt_logprobs"][0] is None


def test_echo_without_logprobs_is_text_only(client: openai.OpenAI) -> None:
    choice = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, echo=True, extra_body=NO_EOS
    ).choices[0]
    assert choice.text.startswith(PROMPT) and choice.logprobs is None


def test_streamed_logprobs_equal_the_whole_response(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, extra_body=NO_EOS
    ).choices[0]
    tokens: list[str] = []
    logprobs: list[float | None] = []
    offsets: list[int] = []
    for chunk in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, stream=True, extra_body=NO_EOS
    ):
        for choice in chunk.choices:
            assert choice.logprobs is not None
            tokens += choice.logprobs.tokens or []
            logprobs += choice.logprobs.token_logprobs or []
            offsets += choice.logprobs.text_offset or []
    assert whole.logprobs is not None
    assert tokens == whole.logprobs.tokens
    assert offsets == whole.logprobs.text_offset
    assert logprobs == pytest.approx(whole.logprobs.token_logprobs, abs=1e-4)


def test_n_choices_with_exact_usage_streamed_and_not(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "n": 3, "seed": 11}
    whole = client.completions.create(**args, extra_body=NO_EOS)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    texts = {0: "", 1: "", 2: ""}
    usage = None
    for chunk in client.completions.create(
        **args, stream=True, stream_options={"include_usage": True}, extra_body=NO_EOS
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 12
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices], "seed + i per choice repeats"
    assert len(set(texts.values())) > 1, "choices are sampled independently"


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something"}],
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**args, extra_body=NO_EOS).choices[0]
    assert whole.logprobs is not None and whole.logprobs.content is not None
    content = whole.logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
    streamed = [
        entry
        for chunk in client.chat.completions.create(**args, stream=True, extra_body=NO_EOS)
        for choice in chunk.choices
        for entry in (choice.logprobs.content or [] if choice.logprobs else [])
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_chat_logprobs_without_top_logprobs(client: openai.OpenAI) -> None:
    choice = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        temperature=0,
        logprobs=True,
        extra_body=NO_EOS,
    ).choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert [e.top_logprobs for e in choice.logprobs.content] == [[], []]


def test_chat_n_choices(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        n=2,
        seed=3,
        extra_body=NO_EOS,
    )
    assert [c.index for c in result.choices] == [0, 1]
    assert result.usage is not None and result.usage.completion_tokens == 6


def test_bad_values_keep_their_400s(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=21)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, top_logprobs=2
        )
    with pytest.raises(openai.BadRequestError, match="greedy"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=2, temperature=0)


def test_streamed_echo_with_n_choices(builtin: openai.OpenAI) -> None:
    """Every choice's first chunk starts with the prompt and its logprobs (vLLM 0.32 fails with a 500)."""
    first: dict[int, Any] = {}
    for chunk in builtin.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=2,
        n=2,
        seed=1,
        logprobs=1,
        echo=True,
        stream=True,
        extra_body=NO_EOS,
    ):
        for choice in chunk.choices:
            first.setdefault(choice.index, choice)
    assert sorted(first) == [0, 1]
    for choice in first.values():
        assert choice.text.startswith(PROMPT)
        assert choice.logprobs.token_logprobs[0] is None


def test_best_of_returns_the_most_likely_candidate(builtin: openai.OpenAI) -> None:
    """best_of=4: the returned choice has the highest cumulative logprob of four; usage counts all four."""
    args: dict[str, Any] = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 3,
        "seed": 5,
        "extra_body": NO_EOS,
    }
    best = builtin.completions.create(**args, best_of=4, logprobs=0)
    assert len(best.choices) == 1 and best.usage is not None and best.usage.completion_tokens == 12
    candidates = builtin.completions.create(**args, n=4, logprobs=0)
    totals = [sum(c.logprobs.token_logprobs) for c in candidates.choices if c.logprobs]
    assert best.choices[0].logprobs is not None
    assert sum(best.choices[0].logprobs.token_logprobs) == pytest.approx(max(totals), abs=1e-4)


def test_tokens_as_token_ids_name_the_exact_prompt_and_output_ids(client: openai.OpenAI) -> None:
    """vLLM's return_tokens_as_token_ids (what the quality probe scores by): exact ids, whatever the text."""
    prompt = [31994, 3853, 5107, 11]
    choice = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=2,
        temperature=0,
        logprobs=2,
        echo=True,
        extra_body={**NO_EOS, "return_tokens_as_token_ids": True},
    ).choices[0]
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    ids = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    assert ids[:4] == prompt and len(ids) == 6
    for top in choice.logprobs.top_logprobs[1:] if choice.logprobs.top_logprobs else []:
        assert all(key.startswith("token_id:") for key in top)
