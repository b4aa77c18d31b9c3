"""Where resources live: the model store, the local cluster of runtime processes, and Kubernetes."""
