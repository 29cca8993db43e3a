"""Low-memory runtime: model, loaders, sampler, backends and CLI."""
