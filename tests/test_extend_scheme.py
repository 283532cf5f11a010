"""Proof that a new scheme is cheap to add: int8 weight-only with a float activation path.

The test copies the package, adds the scheme exactly as docs/architecture.md says (one enum value,
one lowering pass file, one registry line), counts the files that changed, and runs the copy in
a fresh process on a reduced Ideogram 4 mixing the new scheme with w8a8 and float.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fxquant

PASS = '''\
"""lower_int8_wo: int8 weight-only: int8 weights and a float32 scale per row, dequantized per call.

    before:  y = aten.linear(x, get_attr[l.weight], b)
    after:   y = aten.linear(x, (get_attr[l.weight_int8] * get_attr[l.weight_scale][:, None]).to(x.dtype), b)
"""

import torch

from .. import graph, meta
from ..ops.w8a8 import quantize_weight_per_channel
from ..schemes import Scheme
from .base import FxquantPass, PassResult, owned_linears, require_records

aten = torch.ops.aten


class LowerInt8WeightOnly(FxquantPass):
    name = "lower_int8_wo"
    schemes = frozenset({Scheme.INT8_WO})

    def requires(self, gm):
        require_records(gm, self.name, "selection", before="select_schemes")

    def call(self, gm):
        modified = False
        for node, rec, w in owned_linears(gm, self):
            q, scale = quantize_weight_per_channel(w)
            graph.set_buffer(gm, f"{rec.name}.weight_int8", q)
            graph.set_buffer(gm, f"{rec.name}.weight_scale", scale[:, None].contiguous())
            with gm.graph.inserting_before(node):
                wq = graph.get_attr_node(gm, f"{rec.name}.weight_int8", node)
                ws = graph.get_attr_node(gm, f"{rec.name}.weight_scale", node)
                deq = gm.graph.call_function(aten.mul.Tensor, (wq, ws))
                deq = gm.graph.call_function(aten._to_copy.default, (deq,), {"dtype": w.dtype})
            new = graph.replace_node(gm, node, graph.LINEAR, (node.args[0], deq, graph.bias_arg(node)))
            meta.update(new, lowering=meta.Lowering(Scheme.INT8_WO, 8 + 32 / rec.in_features, q.numel() + 4 * q.shape[0]))
            modified = True
        if modified:
            graph.finalize(gm)
        return PassResult(gm, modified)
'''

RUN = '''
import json, sys, torch
import fxquant
from fxquant.models import ideogram4_inputs, reduced_ideogram4
assert fxquant.__file__.startswith(sys.argv[1]), fxquant.__file__
model = reduced_ideogram4(seed=0, num_layers=1)
x = ideogram4_inputs(seed=1)
recipe = {"name": "toy", "default": "int8_wo",
          "rules": [{"match": "layers.0.attention.*", "scheme": "w8a8"}, {"match": "final_layer.*", "scheme": "float"}]}
gm = fxquant.compile(model, fxquant.Recipe.from_dict(recipe), calibration=[x])
with torch.no_grad():
    out, ref = gm(**x).sample, model(**x).sample
ops = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)})
print(json.dumps({"rows": {r.name: r.scheme for r in fxquant.summary(gm)}, "rel": float((out - ref).norm() / ref.norm()),
                  "ops": ops, "state": sorted(k for k in gm.state_dict() if k.endswith(("weight_int8", ".weight")))}))
'''


def _edit(path: Path, anchor: str, line: str) -> None:
    text = path.read_text()
    assert text.count(anchor) == 1, f"{path.name}: the anchor {anchor!r} moved; update docs/architecture.md too"
    path.write_text(text.replace(anchor, anchor + line))


@pytest.mark.slow
def test_a_toy_scheme_is_one_enum_value_one_pass_and_one_registry_line(tmp_path):
    src = Path(fxquant.__file__).parent
    pkg = tmp_path / "fxquant"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    # The three edits docs/architecture.md lists for a new scheme:
    _edit(pkg / "schemes.py", '    FLOAT = "float"  # left in the model\'s float dtype (aten.linear)\n',
          '    INT8_WO = "int8_wo"  # int8 weight-only, dequantized per call (the extension test\'s toy)\n')
    (pkg / "passes" / "lower_int8_wo.py").write_text(PASS)
    _edit(pkg / "pipeline.py", "from .passes.lower_w8a8 import LowerW8A8\n",
          "from .passes.lower_int8_wo import LowerInt8WeightOnly\n")
    _edit(pkg / "pipeline.py", "    Scheme.FLOAT: KeepFloat,\n", "    Scheme.INT8_WO: LowerInt8WeightOnly,\n")

    cmp = filecmp.dircmp(src, pkg, ignore=["__pycache__"])
    touched = []

    def walk(d: filecmp.dircmp, prefix: str) -> None:
        touched.extend(prefix + f for f in d.diff_files + d.right_only + d.left_only)
        for name, sub in d.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(cmp, "")
    assert sorted(touched) == ["passes/lower_int8_wo.py", "pipeline.py", "schemes.py"], touched

    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(RUN), str(pkg)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = {name: "w8a8" if name.startswith("layers.0.attention.") else "float" if name.startswith("final_layer.")
            else "int8_wo" for name in got["rows"]}
    assert got["rows"] == want and sum(v == "int8_wo" for v in want.values()) >= 5
    assert got["ops"] == ["aten.linear.default", "fxquant.linear_w8a8.default"]
    assert not any(k.endswith(".weight") and "feed_forward" in k for k in got["state"])  # float weights replaced
    assert 0 < got["rel"] < 0.05
