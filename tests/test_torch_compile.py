"""torch.compile on what fxquant.compile and fxquant.load return: fullgraph across sequence
lengths and batch sizes, the recompile count, fxquant ops as single opaque nodes, outputs as eager.

Shapes: 3 lengths (text 8 / 13 / 21 + 16 image tokens) x batch 2 and 3. With the default
``dynamic=None`` dynamo compiles static first, then once with a dynamic sequence length, then
once with a dynamic batch: 3 graphs for 6 shapes. With ``dynamic=True``: 1 graph. (Batch 1 is
always specialised by dynamo, so a batch-1 call adds one graph; see docs/architecture.md.)
"""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounter

import fxquant
from fxquant.models import ideogram4_inputs, reduced_ideogram4
from fxquant.ops import linear_gguf, linear_w8a8

from .conftest import rel_err

pytestmark = pytest.mark.slow  # end-to-end on the reduced Ideogram 4 (about a minute on 2 idle cores)

SHAPES = [(b, t) for b in (2, 3) for t in (8, 13, 21)]
FXQUANT_OPS = (linear_w8a8._opoverload, linear_gguf._opoverload)


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    model = reduced_ideogram4(seed=3, num_layers=1)  # one block: every kind of linear, and MRoPE
    calibration = [ideogram4_inputs(batch=2, text_len=8, seed=i) for i in range(2)]
    out = {"float": model}
    for recipe in ("int8-w8a8", "q8_0"):
        gm = fxquant.compile(model, recipe, calibration=calibration)
        path = tmp_path_factory.mktemp("tc") / f"{recipe}.safetensors"
        fxquant.save(gm, path)
        out[f"{recipe}-compiled"], out[f"{recipe}-loaded"] = gm, fxquant.load(path)
    return out


def fxquant_ops(graph: torch.fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target in FXQUANT_OPS)


class Capture:
    """A dynamo backend that keeps every graph it is given and runs it as is."""

    def __init__(self, inner=None):
        self.graphs, self.inner = [], inner

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm.graph)
        return self.inner(gm, example_inputs) if self.inner else gm.forward


def run_shapes(module, compiled, shapes=SHAPES):
    for batch, text_len in shapes:
        x = ideogram4_inputs(batch=batch, text_len=text_len, seed=batch * 100 + text_len)
        with torch.no_grad():
            out, ref = compiled(**x)[0], module(**x)[0]
        assert out.shape == (batch, text_len + 16, 16)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["int8-w8a8-compiled", "q8_0-compiled", "int8-w8a8-loaded"])
def test_fullgraph_across_lengths_and_batches(modules, which):
    module = modules[which]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    capture = Capture()
    counter = CompileCounter()
    compiled = torch.compile(module, fullgraph=True, backend=lambda gm, ex: (capture(gm, ex), counter(gm, ex))[1])
    run_shapes(module, compiled)
    assert counter.frame_count == 3  # static, dynamic length, dynamic batch
    assert not torch._dynamo.utils.counters["graph_break"]
    expected = fxquant_ops(module.graph)
    assert expected > 0 and [fxquant_ops(g) for g in capture.graphs] == [expected] * 3


@pytest.mark.parametrize("which", ["int8-w8a8-compiled", "q8_0-loaded"])
def test_dynamic_true_compiles_once_and_ops_stay_opaque_through_aot(modules, which):
    """aot_eager traces the custom ops' register_fake with symbolic batch and length."""
    module = modules[which]
    torch._dynamo.reset()
    forward_graphs = []

    def keep(gm, _inputs):
        forward_graphs.append(gm.graph)
        return gm

    capture = Capture(aot_autograd(fw_compiler=keep))
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=capture)
    run_shapes(module, compiled)
    assert len(capture.graphs) == 1 and len(forward_graphs) == 1
    assert fxquant_ops(forward_graphs[0]) == fxquant_ops(module.graph) > 0


def test_inductor_matches_eager(modules):
    """Inductor fuses the float ops around the fxquant ops, so its results differ from eager by
    float rounding; where that moves an activation across an int8 rounding boundary the W8A8 op
    turns it into one quantization step. Bound: a tenth of the quantization error itself (relative
    L2 against the float model, about 9e-3 here); measured 3e-6 with one block."""
    module = modules["int8-w8a8-compiled"]
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for batch, text_len in ((2, 8), (3, 13)):
        x = ideogram4_inputs(batch=batch, text_len=text_len, seed=text_len)
        with torch.no_grad():
            out, ref = compiled(**x)[0], module(**x)[0]
            float_ref = modules["float"](**x, return_dict=False)[0]
        assert rel_err(out, ref) < 0.1 * rel_err(ref, float_ref)


def test_drop_in_module_call_forms_compile_once_each(modules):
    """What compile returns takes the source model's call forms; each form is one graph, not one
    per shape: keyword (output dataclass), ``return_dict=False`` (tuple), positional."""
    module = modules["int8-w8a8-loaded"]
    names = ["hidden_states", "timestep", "encoder_hidden_states", "position_ids", "segment_ids", "indicator"]
    forms = {"keyword": lambda f, x: f(**x), "tuple": lambda f, x: f(**x, return_dict=False),
             "positional": lambda f, x: f(*[x[k] for k in names])}
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=counter)
    for batch, text_len in SHAPES:
        x = ideogram4_inputs(batch=batch, text_len=text_len, seed=text_len)
        for call in forms.values():
            with torch.no_grad():
                out, ref = call(compiled, x), call(module, x)
            assert type(out) is type(ref)
            torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    assert type(forms["keyword"](module, x)).__name__ == "Transformer2DModelOutput"
    assert counter.frame_count == len(forms)
