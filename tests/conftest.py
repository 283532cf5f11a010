import pytest
import torch

from fxquant.models import ideogram4_inputs, reduced_ideogram4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``out`` against ``ref``."""
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.fixture(scope="session")
def ideogram_pair():
    """Two reduced Ideogram 4 branches (cond / uncond) with different seeded weights."""
    return {"cond": reduced_ideogram4(seed=1, num_layers=2), "uncond": reduced_ideogram4(seed=2, num_layers=2)}


@pytest.fixture()
def example():
    return ideogram4_inputs(batch=2, text_len=6, image_hw=(4, 4), seed=0)
