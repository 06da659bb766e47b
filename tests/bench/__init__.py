"""The benchmarks (bench/) run end to end."""
