"""The pixels of a cached split's ``image`` column, decoded from PNG at most once when they fit in memory.

A materialised split stores every image as PNG (``datasets.Image``), and training reads each image once per
epoch, so a run of E epochs decodes it E times. Measured on 2 CPU cores: 19 ms to decode a batch of 64
images of 64 px, beside a CLIP training step of about 200 ms. When the whole split's uint8 pixels fit
in ``budget_mb`` (``data.decoded_cache_mb``), each image is decoded on first use and kept. Nothing is decoded
ahead of time, so a short run never pays for images it does not read. Larger splits (the 256 and 1024 px
upsampler crops' sources, a photo collection) are decoded a batch at a time, as before. The budget is per
process and per data-loader worker, since each holds its own copy.
"""

from __future__ import annotations

import datasets
import numpy as np

from unclip.errors import DataError
from unclip.images import rgb_pixels


class SplitPixels:
    """``pixels[indices]`` -> uint8 (B, H, W, 3), the split's images in the order asked for."""

    def __init__(self, split: datasets.Dataset, budget_mb: int) -> None:
        self.images = split.select_columns(["image"])
        self._kept: np.ndarray | None = None
        if len(self.images) and budget_mb > 0:
            height, width, _ = rgb_pixels(self.images[0]["image"]).shape
            if len(self.images) * height * width * 3 <= budget_mb * 2**20:
                # np.zeros maps pages lazily: memory is committed only as images are decoded into it
                self._kept = np.zeros((len(self.images), height, width, 3), dtype=np.uint8)
                self._decoded = np.zeros(len(self.images), dtype=bool)

    @property
    def keeps_decoded(self) -> bool:
        """Whether decoded images are kept (the split fits in the budget)."""
        return self._kept is not None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: list[int]) -> np.ndarray:
        if self._kept is None:
            return np.stack([rgb_pixels(p) for p in self.images[list(indices)]["image"]])
        wanted = np.asarray(indices, dtype=np.int64)
        missing = np.unique(wanted[~self._decoded[wanted]])
        if len(missing):
            for index, picture in zip(missing, self.images[missing.tolist()]["image"]):
                pixels = rgb_pixels(picture)
                if pixels.shape != self._kept.shape[1:]:
                    raise DataError(
                        f"image {index} is {pixels.shape[1]}x{pixels.shape[0]} px where the split's first "
                        f"is {self._kept.shape[2]}x{self._kept.shape[1]}: a cached split holds one size"
                    )
                self._kept[index] = pixels
            self._decoded[missing] = True
        return self._kept[wanted]
