"""Data: the record schema, dataset folders, TFDS builders of the public formats, the tf.data input pipeline,
precomputed latents, and global batches.

TensorFlow is imported by the submodules that need it (``records`` lazily, ``decode`` and ``pipeline``
eagerly); ``schema`` and ``device`` import none, so GPU images without TensorFlow can use them.
"""
