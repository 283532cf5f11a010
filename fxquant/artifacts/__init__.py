"""Artifacts: every file fxquant writes or reads, one module per format, none importing a pass.

    io.py        save / load: the fxquant safetensors artifact (one file, every CFG branch)
    manifest.py  that artifact's manifest: per-tensor and per-section digests, the checks load makes
    export.py    re-export of a lowered module (torch.export program, .pt2)
    gguf.py      save_gguf / gguf_metadata: llama.cpp's GGUF container
    common.py    path checks and the dtypes a file can store
"""
