"""Every test here runs the Triton kernels, on CPU tensors in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton)."""
import pytest


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("FUSED_BACKEND", "triton")
    monkeypatch.delenv("BNORDER_CONV_IMPL", raising=False)
    yield
