"""What our vllm engine and `rebase serve --engine vllm` build, checked against the real vLLM and Ray Serve
LLM (benchmarks/vllm_contract.py). Skipped where vllm does not import (our venv and CI: vLLM needs its
own CUDA torch); run it in an environment that has them:

    ~/.cache/rebase/vllm-venv/bin/python -m pytest -q tests/test_vllm_contract.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "vllm_contract.py"
_spec = importlib.util.spec_from_file_location("vllm_contract", _SCRIPT)
contract = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = contract  # its dataclass resolves annotations through sys.modules
_spec.loader.exec_module(contract)


@pytest.mark.parametrize("check", contract.CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_vllm_contract(check, tmp_path):
    check(tmp_path)
