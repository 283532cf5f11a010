"""Small compiled modules and files shared by the bad-input and fault tests (built once per session)."""

import pytest
import torch

import fxquant
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4

# Linears 256-aligned where Q4_K needs it; the rest are Q8_0 (misaligned="q8_0") beside F32 tensors.
# The paper recipe (SmoothQuant + top-k protection): the default int8-w8a8 adds GPTQ, 3x slower to compile.
W8A8_RECIPE = "int8-w8a8-paper"
GGUF_CFG = dict(num_layers=1, attention_head_dim=64, num_attention_heads=4, intermediate_size=512,
                mrope_section=(12, 10, 10), in_channels=32)


def w8a8_model(seed=1):
    return reduced_ideogram4(seed=seed, num_layers=1)


def w8a8_calibration(seed=0):
    return ideogram4_trajectory(steps=2, seed=seed, text_len=6, image_hw=(4, 4))


def gguf_model(seed=4):
    return reduced_ideogram4(seed=seed, **GGUF_CFG)


def gguf_calibration():
    return [ideogram4_inputs(in_channels=32, seed=6)]


def gguf_recipe():
    return fxquant.Recipe.preset("q8_0")


def inputs(in_channels=16, seed=7):
    return ideogram4_inputs(batch=2, text_len=5, image_hw=(3, 3), seed=seed, in_channels=in_channels, timestep=0.4)


@pytest.fixture(scope="session")
def w8a8():
    return fxquant.compile(w8a8_model(), W8A8_RECIPE, calibration=w8a8_calibration())


@pytest.fixture(scope="session")
def q8():
    return fxquant.compile(gguf_model(), gguf_recipe(), calibration=gguf_calibration())


@pytest.fixture(scope="session")
def gguf_file(q8, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "q8.gguf"
    fxquant.save_gguf(q8, path)
    return path


@pytest.fixture(scope="session")
def pt2_file(w8a8, tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "w8a8.pt2"
    fxquant.save_pt2(w8a8, path)
    return path


@pytest.fixture(scope="session")
def safetensors_file(w8a8, tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "w8a8.safetensors"
    fxquant.save(w8a8, path)
    return path


def run_float(model, x):
    with torch.no_grad():
        return model(**x).sample
