"""Export a lowered module and reload it in a fresh interpreter, twice:

    compiled GraphModule --fxquant.save-->     model.safetensors --fxquant.load-->      GraphModule + records
                         --fxquant.save_pt2--> model.pt2         --torch.export.load--> ExportedProgram

Each reload runs in a new Python process that has neither the model class nor its weights, at a
batch and sequence length the module was not traced with, and must match bit for bit.

    .venv/bin/python examples/export_and_reload.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

import fxquant
from fxquant.models import ideogram4_inputs, ideogram4_trajectory, reduced_ideogram4

RELOAD = r"""
import sys, torch, fxquant
kind, path, inputs, expected = sys.argv[1:]
if kind == "fxquant":
    module = fxquant.load(path)["cond"]                 # verified: format version, digests, shapes, sha256
else:
    # registers the diffusers output dataclass with torch's pytree (fxquant.load does this itself);
    # a bare `import diffusers` is lazy and does not
    import diffusers.models.modeling_outputs  # noqa: F401
    module = torch.export.load(path).module()
out = module(**torch.load(inputs)).sample
same = torch.equal(out, torch.load(expected))
print(f"{kind:8} {type(module).__name__:16} output {tuple(out.shape)} bit-identical: {same}; "
      f"{len(fxquant.summary(module))} linears in its summary")
sys.exit(0 if same else 1)
"""


def main() -> None:
    branches = {"cond": reduced_ideogram4(seed=1, num_layers=2), "uncond": reduced_ideogram4(seed=2, num_layers=2)}
    calibration = {b: ideogram4_trajectory(steps=4, seed=10 + i) for i, b in enumerate(branches)}
    gms = fxquant.compile(branches, "int8-w8a8", calibration=calibration)

    tmp = tempfile.mkdtemp(prefix="fxquant-")
    artifact, pt2 = os.path.join(tmp, "ideogram4.safetensors"), os.path.join(tmp, "ideogram4.cond.pt2")
    fxquant.save(gms, artifact)            # both branches in one file
    fxquant.save_pt2(gms["cond"], pt2)     # one program per .pt2
    print(f"wrote {artifact} ({os.path.getsize(artifact) / 2**20:.2f} MiB) and {pt2} ({os.path.getsize(pt2) / 2**20:.2f} MiB)")

    inputs = ideogram4_inputs(batch=3, text_len=10, image_hw=(5, 7), seed=42, timestep=0.5)  # not the traced shape
    with torch.no_grad():
        expected = gms["cond"](**inputs).sample
    torch.save(inputs, os.path.join(tmp, "inputs.pt"))
    torch.save(expected, os.path.join(tmp, "expected.pt"))

    ok = True
    for kind, path in (("fxquant", artifact), ("pt2", pt2)):
        run = subprocess.run([sys.executable, "-c", RELOAD, kind, path, os.path.join(tmp, "inputs.pt"),
                              os.path.join(tmp, "expected.pt")], capture_output=True, text=True)
        print(run.stdout.strip() or run.stderr.strip().splitlines()[-1])
        ok &= run.returncode == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
