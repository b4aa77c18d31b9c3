"""What the provider, the runtime and the tools share: names, the catalog, the resource spec, model and
adapter file headers, API keys and usage records. Pure: it imports neither pulumi nor torch, so a runtime
replica and a preview load the same rules."""
