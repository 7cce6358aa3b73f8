"""The synthetic dataset: corpus ingestion -> contexts -> questions -> splits -> dataset directory.

The public entry point is :func:`m3distill.data.synth.synthesize`; the directory it writes is described (and read)
by :mod:`m3distill.data.dataset`.
"""
