"""The gateway: one endpoint that routes requests by model name to the deployments of a store, and its server."""
