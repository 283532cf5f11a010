"""A lowered GraphModule -> torch.export .pt2 -> torch.export.load: same outputs, dynamic batch/seq.

    compile(reduced Ideogram 4) --fxquant.save_pt2--> model.pt2 --torch.export.load--> ep.module()
    outputs compared bit for bit with the compiled module on batch and sequence sizes other than
    the tracing example's; the fxquant:: ops and their records survive.
"""

import dataclasses
import subprocess
import sys

import pytest
import torch

import fxquant
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4

W8A8 = torch.ops.fxquant.linear_w8a8.default
RECIPE = fxquant.Recipe(name="naive+protect", protect=("layers.*.feed_forward.w2",))


@pytest.fixture(scope="module")
def compiled():
    model = reduced_ideogram4(seed=4, num_layers=2)
    return fxquant.compile(model, RECIPE, calibration=ideogram4_trajectory(steps=2, seed=3, text_len=6, image_hw=(4, 4)))


@pytest.fixture(scope="module")
def pt2(compiled, tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "ideogram4.pt2"
    fxquant.save_pt2(compiled, path)
    return path


def _count(graph, target):
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is target)


def test_pt2_reloads_with_same_outputs_at_other_batch_and_sequence_sizes(compiled, pt2):
    ep = torch.export.load(pt2)
    module = ep.module()
    for batch, text_len, hw in [(1, 3, (2, 5)), (3, 9, (3, 3)), (2, 6, (4, 4))]:
        ex = ideogram4_inputs(batch=batch, text_len=text_len, image_hw=hw, seed=11, timestep=0.7)
        with torch.no_grad():
            ref, out = compiled(**ex), module(**ex)
        assert type(out) is type(ref)
        torch.testing.assert_close(out.sample, ref.sample, rtol=0, atol=0)


def test_pt2_keeps_dynamic_dims_custom_ops_and_records(compiled, pt2):
    ep = torch.export.load(pt2)
    user_inputs = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ("hidden_states", "indicator")]
    assert len(user_inputs) == 2
    for n in user_inputs:  # batch and sequence are symbols, the feature dim is not
        shape = n.meta["val"].shape
        assert isinstance(shape[0], torch.SymInt) and isinstance(shape[1], torch.SymInt)
    assert _count(ep.graph, W8A8) == _count(compiled.graph, W8A8) == 23 - 2
    loaded_rows = fxquant.summary(ep.module()).rows
    assert loaded_rows == fxquant.summary(compiled).rows
    assert {(r.scheme, r.kind) for r in loaded_rows} == {("w8a8", "quantize"), ("float", "protected")}


def test_pt2_loads_in_a_fresh_process_after_import_fxquant(compiled, pt2, tmp_path):
    ex = ideogram4_inputs(batch=3, text_len=4, image_hw=(3, 2), seed=5)
    torch.save(ex, tmp_path / "ex.pt")
    with torch.no_grad():
        torch.save(compiled(**ex).sample, tmp_path / "ref.pt")
    # fxquant registers the fxquant:: ops; the diffusers import registers the output dataclass
    # as a pytree node, which any exported diffusers model needs.
    script = (
        "import torch, fxquant, diffusers.models.modeling_outputs\n"
        f"m = torch.export.load({str(pt2)!r}).module()\n"
        f"ex = torch.load({str(tmp_path / 'ex.pt')!r})\n"
        f"print('OK' if torch.equal(m(**ex).sample, torch.load({str(tmp_path / 'ref.pt')!r})) else 'MISMATCH')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "OK"


def test_export_needs_the_recorded_example_or_an_explicit_one(compiled):
    rec = compiled.meta["fxquant"]
    compiled.meta["fxquant"] = dataclasses.replace(rec, example_inputs=None)
    try:
        with pytest.raises(fxquant.FxquantError, match="no example inputs"):
            fxquant.export_program(compiled)
        ep = fxquant.export_program(compiled, ideogram4_inputs(batch=1, text_len=5, image_hw=(2, 2)))
        assert _count(ep.graph, W8A8) == 21
    finally:
        compiled.meta["fxquant"] = rec


def test_save_pt2_into_a_missing_folder_names_the_path(compiled, tmp_path):
    with pytest.raises(fxquant.FormatError, match="save_pt2: cannot write .*/no/m.pt2: the folder .* does not exist"):
        fxquant.save_pt2(compiled, tmp_path / "no" / "m.pt2")
    assert not (tmp_path / "no").exists()
