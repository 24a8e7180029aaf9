"""model_loader: dummy weights, real weights from a directory or the hub cache, errors that name the fix."""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AttentionInterface, PreTrainedModel, PreTrainedTokenizerFast
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from serving.config import ConfigError, DeploymentConfig
from serving.engine.model_loader import (
    DUMMY_WEIGHT_GAIN,
    load_model,
    load_tokenizer,
    resolve_device,
)

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
PROMPT = torch.tensor([[31994, 1000, 2000, 3000, 4000, 5000, 6000, 7000]])


def config(**flat: Any) -> DeploymentConfig:
    return DeploymentConfig().replace(**{"model.path": "llama-tiny", **flat})


def embedding(model: PreTrainedModel) -> torch.Tensor:
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight


def generate(model: Any) -> Callable[..., torch.Tensor]:
    """model.generate (GenerationMixin), which the PreTrainedModel annotation does not show to mypy."""
    return model.generate  # type: ignore[no-any-return]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='cuda'"):
            resolve_device("cuda")


def test_load_tokenizer_from_model_dir_and_from_model_tokenizer(tmp_path: Path) -> None:
    tok = load_tokenizer(config().model)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 32000
    tok.save_pretrained(tmp_path / "tok")
    other = load_tokenizer(config(**{"model.tokenizer": str(tmp_path / "tok")}).model)
    assert other.encode("héllo wörld") == tok.encode("héllo wörld")
    with pytest.raises(ConfigError, match=r"model\.tokenizer"):
        load_tokenizer(config(**{"model.tokenizer": str(tmp_path / "missing")}).model)


def test_dummy_weights_are_seeded() -> None:
    first = load_model(config(), "sdpa", CPU)
    again = load_model(config(), "sdpa", CPU)
    other_seed = load_model(config(**{"model.seed": 1}), "sdpa", CPU)
    assert not first.training
    assert not any(p.requires_grad for p in first.parameters())
    assert torch.equal(logits(first), logits(again))
    assert not torch.allclose(logits(first), logits(other_seed))
    hidden = first.config.hidden_size
    std = embedding(first).std().item()
    assert abs(std - DUMMY_WEIGHT_GAIN / hidden**0.5) < 0.01


@pytest.mark.parametrize("model", ["llama-tiny", "llama-57m"])
def test_dummy_greedy_output_does_not_collapse(model: str) -> None:
    """Greedy decoding must not repeat one token, or engine equality tests would prove nothing."""
    loaded = load_model(config(**{"model.path": model}), "sdpa", CPU)
    for prompt in (PROMPT, torch.tensor([[31994, 5, 6, 7]])):
        out = generate(loaded)(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert len(set(out[0, prompt.shape[1] :].tolist())) >= 16


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_dummy_weights_match_across_processes() -> None:
    script = (
        "import hashlib\n"
        "import torch\n"
        "from serving.config import DeploymentConfig\n"
        "from serving.engine.model_loader import load_model\n"
        f"{inspect.getsource(weights_digest)}\n"
        "m = load_model(DeploymentConfig().replace(**{'model.path': 'llama-tiny', 'model.seed': 7}), 'sdpa', "
        "torch.device('cpu'))\n"
        "print(weights_digest(m))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    here = load_model(config(**{"model.seed": 7}), "sdpa", CPU)
    assert result.stdout.strip().splitlines()[-1] == weights_digest(here)
    assert weights_digest(load_model(config(**{"model.seed": 8}), "sdpa", CPU)) != weights_digest(here)


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_casts_the_same_dummy_weights(dtype: str, torch_dtype: torch.dtype) -> None:
    reference = load_model(config(), "sdpa", CPU)
    model = load_model(config(**{"precision.dtype": dtype}), "sdpa", CPU)
    assert {p.dtype for p in model.parameters()} == {torch_dtype}
    assert torch.equal(embedding(model), embedding(reference).to(torch_dtype))


def test_auto_loads_saved_weights_with_identical_logits(tmp_path: Path) -> None:
    dummy = load_model(config(**{"model.seed": 3}), "sdpa", CPU)
    dummy.save_pretrained(tmp_path / "saved")
    assert list((tmp_path / "saved").glob("*.safetensors"))
    loaded = load_model(
        config(**{"model.path": str(tmp_path / "saved"), "model.load_format": "auto"}), "sdpa", CPU
    )
    assert torch.equal(logits(loaded), logits(dummy))


def test_auto_without_weights_names_load_format() -> None:
    with pytest.raises(ConfigError, match=r"model\.load_format='auto'.*no weight files"):
        load_model(config(**{"model.load_format": "auto"}), "sdpa", CPU)


def test_hub_id_loads_from_the_local_cache_only(tmp_path: Path) -> None:
    """A hub id resolves through HF_HUB_CACHE (a real cache layout), with no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / commit
    load_model(config(), "sdpa", CPU).save_pretrained(snapshot)
    load_tokenizer(config().model).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "import torch\n"
        "from serving.config import DeploymentConfig\n"
        "from serving.engine.model_loader import load_model, load_tokenizer\n"
        "c = DeploymentConfig().replace(**{'model.path': 'acme/tiny-llama', 'model.load_format': 'auto'})\n"
        "m = load_model(c, 'sdpa', torch.device('cpu'))\n"
        "print(len(load_tokenizer(c.model)), m.config.num_hidden_layers)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "32000 2"


@pytest.mark.parametrize("path", ["acme/not-in-the-cache", "not a hub id"])
def test_unknown_hub_id_is_a_config_error_with_the_fix(path: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.path=.*local directory") as err:
        load_model(config(**{"model.path": path}), "sdpa", CPU)
    assert path in str(err.value)


def test_missing_local_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.path=.*no such directory"):
        load_model(config(**{"model.path": str(tmp_path / "nope")}), "sdpa", CPU)


def test_max_model_len_beyond_position_table_is_refused() -> None:
    cfg = DeploymentConfig().replace(
        **{"model.path": "llama-tiny", "model.max_model_len": 8192, "scheduler.chunked_prefill": True}
    )
    with pytest.raises(ConfigError, match=r"model\.max_model_len=8192"):
        load_model(cfg, "sdpa", CPU)


def test_attn_implementation_is_passed_through() -> None:
    """A function registered with AttentionInterface is the one the loaded model calls."""
    calls: list[int] = []

    def counting_sdpa(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(module.layer_idx)  # type: ignore[arg-type]
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("test_counting_sdpa", counting_sdpa)
    model = load_model(config(), "test_counting_sdpa", CPU)
    reference = load_model(config(), "eager", CPU)
    assert reference.config._attn_implementation == "eager"
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)
    assert calls == [0, 1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_model_built_directly_equals_the_one_converted_from_transformers(dtype: str) -> None:
    """Same dummy draws, same RoPE table: the engine's own build matches transformers' model exactly."""
    from serving.engine.attention import attn_implementation_name
    from serving.engine.llama import LeanLlama
    from serving.engine.model_loader import load_engine_model

    flat = {"model.path": "llama-tiny", "device": "cpu", "precision.dtype": dtype}
    config = DeploymentConfig.from_flat(flat)
    direct = load_engine_model(config, torch.device("cpu"))
    converted = load_model(config, attn_implementation_name("paged"), torch.device("cpu"), lean=True)
    assert isinstance(direct, LeanLlama) and isinstance(converted, LeanLlama)
    a, b = direct.state_dict(), converted.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if dtype == "float32":  # transformers' bfloat16 model rounds its inv_freq buffer to bfloat16 first
        assert torch.equal(direct.model.cos, converted.model.cos)
        assert torch.equal(direct.model.sin, converted.model.sin)
