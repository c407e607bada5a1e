import pytest
import torch


@pytest.fixture(autouse=True)
def _quiet_compile():
    torch._dynamo.reset()
    yield
