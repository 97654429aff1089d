"""Developer tools built on the registries: smoke checks, benchmarks' inputs, the README
feature table, profiling. Each module is run as ``python -m linearnexus.tools.<name>``.

Nothing here is imported by ``import linearnexus``.
"""
