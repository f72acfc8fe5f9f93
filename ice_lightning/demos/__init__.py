"""Demos beside the product, never imported by it (as Lightning's ``pytorch/demos``): worlds small enough to run
here, reached by the product only as registered pipeline names.

- :mod:`ice_lightning.demos.shapes`: the shapes world, where image-level erasure is measured exactly (renderer,
  data, detectors, pixel pipeline, the shipped image and video models, evaluation); ``shapes-image``,
  ``shapes-video``, ``new:KIND``.
- :mod:`ice_lightning.demos.tiny`: tiny offline pipelines of every supported architecture, built from configs
  (``tiny:KIND``; ``python -m ice_lightning.demos.tiny sd DIR`` saves one).
"""
