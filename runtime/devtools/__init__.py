"""Developer tools beside the runtime, not part of serving: benchmarks, the GPU check, the tiny-model kit."""
