"""pyproject's transformers bound admits only versions with the API the IPN calls: ``cache=`` in the
causal LM's forward and ``out.cache`` in its output (5.17-5.23 take ``past_key_values`` only)."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import transformers
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def _transformers_requirement() -> Requirement:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "transformers")


def test_the_bound_starts_where_the_cache_argument_does():
    spec = _transformers_requirement().specifier
    assert not spec.contains("5.23.0") and not spec.contains("5.18.0") and spec.contains("5.24.0")
    assert spec.contains(transformers.__version__)  # the venv the tests run in is one the bound admits


def test_the_installed_transformers_takes_cache_and_returns_it():
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    assert "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    assert "cache" in CausalLMOutputWithPast.__dataclass_fields__
    assert Version(transformers.__version__) >= Version("5.24")
