"""fxquant passes, one per file, named by what they do. See `fxquant.pipeline` for their order."""
