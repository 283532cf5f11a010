"""Load an fxquant ``.gguf`` (from `fxquant.save_gguf`) with diffusers' own GGUF loader.

    fxquant.save_gguf(gm, "t.gguf")
        -> Ideogram4Transformer2DModel.from_single_file("t.gguf", config=<local dir>,
                                                       quantization_config=GGUFQuantizationConfig(...))
           nn.Linear with a Q4_K / Q8_0 weight  ->  diffusers GGUFLinear (dequantizes on the fly)

diffusers 0.42 has no single-file entry for ``Ideogram4Transformer2DModel``, so
``from_single_file`` refuses it. `single_file_support` is a context manager that adds one to
``diffusers.loaders.single_file_model.SINGLE_FILE_LOADABLE_CLASSES`` for the duration of the
``with`` block and removes it after: the one change to diffusers' state, made only when the user
asks, and undone. fxquant files use diffusers' state-dict names, so the entry's checkpoint
mapping is the identity; diffusers calls it only when the names do not match, and then it raises,
naming the missing and unexpected keys, instead of loading a half-filled model.

The config always comes from a local directory: the caller's (``model.save_config(dir)``) or
the one `save_gguf` recorded in the file (``fxquant.model_config``), written to a temporary
directory. Nothing is fetched from the Hub.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from typing import Any, Iterator, Optional, Union

import torch

from ..errors import FormatError, MissingDependencyError
from ..artifacts.gguf import gguf_metadata

SUPPORTED = ("Ideogram4Transformer2DModel",)


def _model_class(name: str) -> Any:
    import diffusers

    if name not in SUPPORTED:
        raise FormatError(f"fxquant.integrations.diffusers: no single-file support for {name!r}; supported: {list(SUPPORTED)}")
    return getattr(diffusers, name)


def _identity_or_raise(cls: Any) -> Any:
    def same_names(checkpoint: dict, config: Any = None, **_: Any) -> dict:
        # diffusers calls this only when the checkpoint's keys differ from the model's.
        with torch.device("meta"):
            expected = set(cls.from_config(config).state_dict())
        missing, unexpected = sorted(expected - set(checkpoint)), sorted(set(checkpoint) - expected)
        raise FormatError(f"{cls.__name__}: the GGUF's tensor names are not the model's state-dict keys "
                          f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); "
                          "was it written by fxquant.save_gguf for a model with this config?")

    return same_names


@contextlib.contextmanager
def single_file_support(class_name: str = "Ideogram4Transformer2DModel") -> Iterator[None]:
    """Within the ``with`` block, ``<class>.from_single_file`` accepts fxquant ``.gguf`` files.

    If diffusers already has an entry for the class (a later version), it is left as it is.

    Example:
        >>> from diffusers import GGUFQuantizationConfig, Ideogram4Transformer2DModel  # doctest: +SKIP
        >>> with single_file_support():                                                # doctest: +SKIP
        ...     m = Ideogram4Transformer2DModel.from_single_file(
        ...         "t.gguf", config="t_config/", quantization_config=GGUFQuantizationConfig(torch.float32))
    """
    from diffusers.loaders import single_file_model

    cls = _model_class(class_name)
    table = single_file_model.SINGLE_FILE_LOADABLE_CLASSES
    if class_name in table:
        yield
        return
    table[class_name] = {"checkpoint_mapping_fn": _identity_or_raise(cls), "default_subfolder": "transformer"}
    try:
        yield
    finally:
        table.pop(class_name, None)


def load_gguf(path: Union[str, "os.PathLike[str]"], config: Optional[Union[str, "os.PathLike[str]"]] = None,
              compute_dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None) -> Any:
    """Load an fxquant ``.gguf`` as a diffusers model with diffusers' GGUF quantizer.

    Args:
        path: a file written by `fxquant.save_gguf`.
        config: a local directory holding the model's ``config.json`` (``model.save_config(dir)``);
            None uses the config recorded in the file.
        compute_dtype: the dtype diffusers' ``GGUFLinear`` dequantizes to and computes in; float
            tensors are loaded in it too.
        device: where to put the weights (default CPU).

    Returns:
        The diffusers model (eval mode); quantized linears are ``GGUFLinear`` holding the file's bytes.

    Raises:
        FormatError: not an fxquant GGUF, a malformed file or one whose key or tensor does not match
            its digest (naming it), an unsupported model class, no config given or recorded, or
            tensor names that are not the model's. A GGUF without fxquant digests loads with a warning.
        MissingDependencyError: diffusers, accelerate or gguf-py is not installed.
    """
    md = gguf_metadata(path)  # the file's structure and digests, before diffusers reads a byte
    for package in ("diffusers", "accelerate", "gguf"):  # diffusers' GGUF quantizer needs all three
        if importlib.util.find_spec(package) is None:
            raise MissingDependencyError(f"load_gguf needs {package}, which is not installed: pip install {package} "
                                         "(or pip install 'fxquant[diffusers]')")
    from diffusers import GGUFQuantizationConfig

    cls = _model_class(md.get("fxquant.model_class", md.get("general.architecture", "")))
    with contextlib.ExitStack() as stack:
        if config is None:
            if "fxquant.model_config" not in md:
                raise FormatError(f"{os.fspath(path)}: no fxquant.model_config recorded; pass config=<local dir>")
            config = stack.enter_context(tempfile.TemporaryDirectory())
            with open(os.path.join(config, "config.json"), "w", encoding="utf-8") as f:
                json.dump(md["fxquant.model_config"], f)
        elif not os.path.isfile(os.path.join(config, "config.json")):
            raise FormatError(f"config: {os.fspath(config)!r} is not a local directory with a config.json")
        stack.enter_context(single_file_support(cls.__name__))
        return cls.from_single_file(
            os.fspath(path), config=os.fspath(config), local_files_only=True, torch_dtype=compute_dtype,
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype), device=device,
        )
