"""The framework-neutral core: schemas, codecs, Arrow batches, re-batching, sampling, merging.

Nothing here opens a file or a socket; the store, the online transport, teachers and
students are built on it.
"""
