"""Reading real LoRA files (`fxquant.load_lora`): files written by diffusers' own saver and by
PEFT, checked against PEFT's runtime LoRA on the same float model; kohya's layout; bad files
as LoraErrors naming the key."""

import copy
import json

import pytest
import torch

import fxquant
from fxquant.models import ideogram4_inputs, reduced_ideogram4

peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]


def peft_model(base, **config):
    """``base`` with a PEFT LoRA (diffusers' ``add_adapter``) whose B is random, not zero."""
    from peft import LoraConfig

    model = copy.deepcopy(base)
    model.add_adapter(LoraConfig(target_modules=TARGETS, init_lora_weights=False, **config))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def run(m, ex):
    with torch.no_grad():
        return m(**ex)[0]


@pytest.fixture(scope="module")
def base():
    return reduced_ideogram4(seed=3, num_layers=2)


@pytest.fixture(scope="module")
def ex():
    return ideogram4_inputs(batch=2, text_len=5, image_hw=(3, 4), timestep=0.3, seed=11)


def test_diffusers_pipeline_file_with_alpha_and_rank_pattern(base, ex, tmp_path):
    from diffusers import Ideogram4Pipeline
    from peft.utils import get_peft_model_state_dict

    config = dict(r=4, lora_alpha=8, rank_pattern={"w2": 2}, alpha_pattern={"to_out.0": 1})
    model = peft_model(base, **config)
    Ideogram4Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    lw = fxquant.load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    factors = {layer.module: layer.factor for _, layer in lw.layers}
    assert factors["layers.0.attention.to_q"] == 2.0 and factors["layers.0.feed_forward.w2"] == 4.0
    assert factors["layers.1.attention.to_out.0"] == 0.25
    assert {c for c, _ in lw.layers} == {"transformer"}
    ref = run(model, ex)
    assert (ref - run(base, ex)).norm() / ref.norm() > 0.01
    torch.testing.assert_close(run(fxquant.merge_lora(base, lw), ex), ref, rtol=1e-4, atol=1e-5)
    # Without the metadata, diffusers' default is alpha = rank: factor 1.
    plain = fxquant.load_lora(dict(lw_state(lw)))
    assert {layer.factor for _, layer in plain.layers} == {1.0}


def lw_state(lw):
    for _, layer in lw.layers:
        yield layer.key, layer.down
        yield layer.key.replace("lora_A", "lora_B"), layer.up


def test_peft_folder_with_rslora(base, ex, tmp_path):
    from peft import get_peft_model

    model = peft_model(base, r=4, lora_alpha=6, use_rslora=True)
    bare = model.peft_config["default"]
    get_peft_model(copy.deepcopy(base), bare).save_pretrained(tmp_path)  # writes adapter_config.json
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, tmp_path / "adapter_model.safetensors")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    lw = fxquant.load_lora(tmp_path)
    assert {layer.factor for _, layer in lw.layers} == {3.0}  # 6 / sqrt(4)
    torch.testing.assert_close(run(fxquant.merge_lora(base, lw), ex), run(model, ex), rtol=1e-4, atol=1e-5)


def test_kohya_layout_maps_by_underscores(base, ex):
    from peft.utils import get_peft_model_state_dict

    model = peft_model(base, r=4, lora_alpha=2)
    kohya = {}
    for k, v in get_peft_model_state_dict(model).items():
        module, _, part = k.partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v
        kohya[f"{name}.alpha"] = torch.tensor(2.0)
    lw = fxquant.load_lora(kohya)
    assert all(layer.kohya and layer.factor == 0.5 for _, layer in lw.layers)
    torch.testing.assert_close(run(fxquant.merge_lora(base, lw), ex), run(model, ex), rtol=1e-4, atol=1e-5)
    with pytest.raises(fxquant.LoraError, match="lora_unet_layers_7_w1.lora_down.weight.*matches no linear"):
        fxquant.merge_lora(base, {"lora_unet_layers_7_w1.lora_down.weight": torch.zeros(2, 4),
                                  "lora_unet_layers_7_w1.lora_up.weight": torch.zeros(4, 2)})


@pytest.mark.parametrize("state, message", [
    ({"transformer.a.lora_A.weight": torch.zeros(2, 4), "transformer.a.lora_B.weight": torch.zeros(4, 2),
      "transformer.a.lora_magnitude_vector": torch.zeros(4)}, "a.lora_magnitude_vector.*unsupported layout"),
    ({"transformer.a.lora_A.weight": torch.zeros(2, 4), "transformer.a.lora_B.weight": torch.zeros(4, 2),
      "transformer.a.lora_B.bias": torch.zeros(4)}, "a.lora_B.bias.*unsupported layout"),
    ({"transformer.a.lora_A.weight": torch.zeros(2, 4)}, "transformer.a.lora_A.weight.*no matching up"),
    ({"transformer.a.lora_A.weight": torch.zeros(2, 4), "transformer.a.lora_B.weight": torch.zeros(4, 3)},
     "a.lora_B.weight.*rank 3.*rank 2"),
    ({"lora_unet_a.lora_down.weight": torch.zeros(2, 4, 1, 1), "lora_unet_a.lora_up.weight": torch.zeros(4, 2, 1, 1)},
     "lora_unet_a.lora_down.weight.*2-d float tensor.*conv"),
    ({"transformer.a.weight": torch.zeros(2, 4)}, "transformer.a.weight.*not a LoRA weight"),
    ({"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
      "lora_unet_a.alpha": torch.zeros(2)}, "lora_unet_a.alpha.*one number"),
])
def test_bad_files_name_the_key(state, message):
    with pytest.raises(fxquant.LoraError, match=message):
        fxquant.load_lora(state)


def test_missing_file_and_rank_disagreeing_with_config(tmp_path):
    with pytest.raises(fxquant.LoraError, match="no such file"):
        fxquant.load_lora(tmp_path / "nope.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(fxquant.LoraError, match="x.safetensors is not a readable safetensors file"):
        fxquant.load_lora(tmp_path / "x.safetensors")
    state = {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(fxquant.LoraError, match="a.lora_A.weight.*rank 2 but the adapter config says 8"):
        fxquant.load_lora(state, config={"r": 8, "lora_alpha": 8})
    with pytest.raises(fxquant.LoraError, match="use_dora"):
        fxquant.load_lora(state, config={"r": 2, "lora_alpha": 2, "use_dora": True})
