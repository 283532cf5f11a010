"""Artifacts: every file fxquant writes or reads, one module per format, none importing a pass.

    io.py        save / load: the fxquant safetensors artifact (one file, every CFG branch)
    manifest.py  that artifact's manifest: per-tensor and per-section digests, the checks load makes
    export.py    re-export of a lowered module (torch.export program)
    pt2.py       save_pt2 / load_pt2: that program as a verified .pt2
    gguf.py      save_gguf / gguf_metadata: llama.cpp's GGUF container
    common.py    path checks, atomic writes and the dtypes a file can store
"""
