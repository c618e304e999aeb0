"""captool.benchmarks: the runtime measured against PyTorch and against this machine's compute and memory floor."""
