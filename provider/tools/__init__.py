"""The `ember` command and what it runs: the offline runner, schema generation, stack files and billing."""
