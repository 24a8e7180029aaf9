"""Compiled execution (model.compile: compiled): the same greedy tokens as transformers' generate, for every
policy and attention backend, with one compiled graph serving every step shape (no recompiles); compiled
int8_dynamic gives the tokens of the same int8 model run eagerly."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from serving.config import ConfigError, DeploymentConfig
from serving.engine.attention import attn_implementation_name
from serving.engine.compile_support import check_compile
from serving.engine.compiled import bucket
from serving.engine.llm_engine import LLMEngine
from serving.engine.model_loader import load_model
from serving.engine.quantization import apply_quantization
from serving.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PROMPT_LENS = (1, 5, 17, 33, 64, 9)
GREEDY = SamplingParams(max_tokens=10, temperature=0)


def deployment(**flat: Any) -> DeploymentConfig:
    base = {"model.path": "llama-tiny", "model.max_model_len": 128, "cache.block_size": 8, "device": "cpu"}
    return DeploymentConfig.from_flat({**base, **flat})


@pytest.fixture(scope="module")
def compiled_model() -> torch.nn.Module:
    cfg = deployment(**{"model.compile": "compiled"})
    return load_model(cfg, attn_implementation_name("paged"), torch.device("cpu"), lean=True)


@pytest.fixture(scope="module")
def prompts_and_reference() -> tuple[list[list[int]], list[list[int]]]:
    gen = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(0, 31900, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    hf = load_model(deployment(), "sdpa", torch.device("cpu"))
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)  # type: ignore[operator]
            out.append(ids[0, len(p) :].tolist())
    return prompts, out


@pytest.mark.parametrize(
    ("policy", "attention"),
    list(itertools.product(["request", "static", "continuous"], ["eager", "sdpa", "paged"])),
)
def test_compiled_greedy_tokens_equal_generate(
    compiled_model: torch.nn.Module,
    prompts_and_reference: tuple[list[list[int]], list[list[int]]],
    policy: str,
    attention: str,
) -> None:
    prompts, reference = prompts_and_reference
    flat = {"scheduler.policy": policy, "attention": attention, "scheduler.batch_wait_ms": 0}
    engine = LLMEngine(deployment(**flat), compiled_model, num_blocks=64)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph, compiled at load, serves all
        assert engine.generate(prompts, GREEDY) == reference
    assert engine.stats().kv_blocks_used == 0


@pytest.fixture(scope="module")
def compiled_int8_model() -> torch.nn.Module:
    cfg = deployment(**{"model.compile": "compiled", "precision.quantization": "int8_dynamic"})
    return load_model(cfg, attn_implementation_name("paged"), torch.device("cpu"), lean=True)


def test_compiled_int8_dynamic_runs_torchao_int8_and_matches_it_eager(
    compiled_int8_model: torch.nn.Module, prompts_and_reference: tuple[list[list[int]], list[list[int]]]
) -> None:
    """Compiled, int8_dynamic is torchao's int8 (quantization.py's measured choice), one graph for every
    policy (identical tokens across them). Against the same quantisation run eagerly the int8 rounding of
    inductor's kernel and torchao's eager one differ in the last bits, so a near tie can flip a later token:
    measured 5 of 6 prompts identical over 10 tokens, the sixth from its 5th token on. Required: every first
    token equal and at least 5 of 6 sequences equal."""
    weights = [m.weight for m in compiled_int8_model.modules() if isinstance(m, torch.nn.Linear)]
    assert weights and all("torchao" in type(w).__module__ for w in weights)
    cfg = deployment(**{"precision.quantization": "int8_dynamic"})
    eager = load_model(deployment(), attn_implementation_name("paged"), torch.device("cpu"), lean=True)
    eager = apply_quantization(eager, cfg.precision, torch.device("cpu"), compiled=True)
    prompts, _ = prompts_and_reference
    expected = LLMEngine(cfg, eager, num_blocks=64).generate(prompts, GREEDY)
    outputs = []
    for policy in ("request", "static", "continuous"):
        flat = {
            "scheduler.policy": policy,
            "scheduler.batch_wait_ms": 0,
            "precision.quantization": "int8_dynamic",
        }
        engine = LLMEngine(deployment(**flat), compiled_int8_model, num_blocks=64)
        with torch._dynamo.config.patch(error_on_recompile=True):
            outputs.append(engine.generate(prompts, GREEDY))
    assert outputs[0] == outputs[1] == outputs[2]
    assert [tokens[0] for tokens in outputs[0]] == [tokens[0] for tokens in expected]
    assert sum(got == want for got, want in zip(outputs[0], expected, strict=True)) >= len(prompts) - 1


def test_buckets_are_powers_of_two_never_one() -> None:
    assert [bucket(n) for n in (1, 2, 3, 8, 9, 2048)] == [2, 2, 4, 8, 16, 2048]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"parallel.tp": 2}, "parallel.tp"),
        ({"parallel.pp": 2}, "parallel.pp"),
        ({"precision.quantization": "int8_weight_only"}, "precision.quantization"),
    ],
)
def test_unsupported_compiled_layouts_are_refused_naming_the_field(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        check_compile(deployment(**{"model.compile": "compiled", **overrides}))
