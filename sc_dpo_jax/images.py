"""Small image helpers shared by the CLIs, the trainer and the reports (host-side numpy and PIL)."""
from __future__ import annotations

import io
import math
import os

import numpy as np


def make_grid(images: np.ndarray, columns: int) -> np.ndarray:
  """Tiles uint8 ``[N, H, W, 3]`` images into one ``[rows*H, columns*W, 3]`` image (row-major, black fill)."""
  n, h, w, c = images.shape
  columns = max(1, min(columns, n))
  rows = math.ceil(n / columns)
  grid = np.zeros((rows * h, columns * w, c), images.dtype)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def encode_png(image: np.ndarray) -> bytes:
  """The PNG file of a uint8 ``[H, W, 3]`` image, as bytes (for ``epath.Path(...).write_bytes``: any filesystem)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 ``[H, W, 3]`` image to a local ``path`` (``encode_png``'s bytes), creating the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(encode_png(image))
