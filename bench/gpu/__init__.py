"""The GPU benchmark (bench/gpu/run.sh): the case matrix, the per-case child, the report, the carried wheels."""
