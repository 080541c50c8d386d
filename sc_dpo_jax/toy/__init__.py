"""The toy world: a miniature of the safety-alignment problem that runs end to end on a CPU."""
