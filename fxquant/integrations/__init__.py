"""Optional integrations with other libraries. Nothing here is imported by ``import fxquant``,
and importing a submodule changes nothing: each integration is a function the user calls.

    fxquant.integrations.diffusers   load an fxquant ``.gguf`` with diffusers' GGUF loader
"""
