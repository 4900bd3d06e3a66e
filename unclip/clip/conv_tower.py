"""A small convolutional image tower for CLIPs trained in minutes on a CPU.

A tiny ViT trained contrastively on ``shapes`` learns colour at once and shape not at all within a CPU budget
(measured: zero-shot shape stays near chance after 1,000 steps). Shape has to be read from edges whatever the
object's and the background's colours are. Three choices make a convnet learn it within minutes. Each one was
measured on a supervised shape probe, with the same conv net and budget, and without the first it stays at
chance:

- **Median-centred input.** Besides the image, the net sees the image minus its per-channel median colour and
  that difference's magnitude. It is a per-image normalisation in the spirit of instance normalisation
  (Ulyanov et al. 2016). In a photograph the median is the dominant colour. In ``shapes`` it is the
  background, so the magnitude channel is a colour-blind silhouette.
- **Coordinate channels** (Liu et al. 2018, "CoordConv"). After global pooling, features can still say where
  the object is, and captions name its position.
- **BatchNorm** after every convolution, as in CLIP's ResNets (Radford et al. 2021 §2.4). GroupNorm learned
  shape several times slower in the same probe. Batch statistics are per process. On GPUs the trainer syncs
  them across processes; on CPU (gloo) PyTorch's SyncBatchNorm does not run.

The features are global max-pooled and projected to the embedding dimension, as a ViT's pooled token is.

How deep and wide (``conf/clip_model/tiny_convnet.yaml``): the tower is compute-bound (the five-layer
tower's convolutions ran at about 65 GFLOP/s, near this CPU's fp32 matmul peak), so fewer FLOPs buy a recipe
more steps. Screened on
``shapes`` with the CLIP recipe (batch 64, lr 2e-3, cosine schedule over the run; zero-shot shape accuracy
on 500 images each of seen / held-out (colour, shape) pairs; step time of a batch on 2 cores, noisy by
about 15 % on this VM):

    channels (strides)                     conv MACs/image  step    steps  shape seen / held-out
    32, 64, 128, 128, 128 (2, 2, 2, 1, 1)  31 M             255 ms  800    0.750 / 0.598
                                                                    1600   0.982 / 0.914
    24, 48, 96, 128 (2, 2, 2, 1)           14 M             162 ms  1200   0.962 / 0.882
                                                                    1350   0.978 / 0.922  (the recipe)
                                                                    1500   0.994 / 0.958
    24, 48, 96, 128, lr 3e-3               14 M             162 ms  1250   0.882 / 0.762
    24, 48, 96 (2, 2, 2)                   7 M              148 ms  1250   0.790 / 0.502
    32, 64, 128, 128, 128 at batch 32      31 M             -       2400   0.754 / 0.694

The narrower four-layer tower learns shape at least as fast per step as the five-layer one (whose 1600-step
run stood at 0.950 / 0.822 at step 1200, its learning rate still higher) in 63 % of the time per step;
three layers are too few, and batch 32 learns less per image seen. The rest of the step does not shrink
with the tower: the text tower, whose 49,408-row token embedding the optimizer and the EMA update every step
(about 15 ms of it), and the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from unclip.errors import ConfigError


class MedianCentredInput(nn.Module):
    """(B, 3, H, W) -> (B, 9, H, W): the image, the image minus its per-channel median, that difference's L1
    magnitude, and x/y coordinates in [-1, 1], in channels-last memory layout.

    Channels-last makes every convolution after it run channels-last too, which oneDNN (CPU) and cuDNN
    (tensor cores) prefer: measured 0.42 s against 0.50-0.58 s for the tower's forward and backward at batch
    128 on 2 CPU cores.
    """

    out_channels = 9

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        median = images.flatten(2).median(dim=-1).values[..., None, None]
        centred = images - median
        magnitude = centred.abs().sum(dim=1, keepdim=True)
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, 2, h, w)
        stacked = torch.cat([images, centred, magnitude, grid], dim=1)
        return stacked.contiguous(memory_format=torch.channels_last)


class ConvTower(nn.Module):
    """Median-centred input, 3x3 conv + BatchNorm + ReLU blocks, global max pool, linear projection.

    Exposes what open_clip's image towers expose to the rest of the code: ``image_size`` and ``output_dim``.
    """

    def __init__(self, image_size: int, channels: list[int], strides: list[int], output_dim: int) -> None:
        super().__init__()
        if not channels or len(channels) != len(strides) or any(s not in (1, 2) for s in strides):
            raise ConfigError(
                f"conv_tower needs one stride (1 or 2) per channel count, got channels={channels}, "
                f"strides={strides}"
            )
        self.image_size = image_size
        self.output_dim = output_dim
        layers: list[nn.Module] = [MedianCentredInput()]
        previous = MedianCentredInput.out_channels
        for width, stride in zip(channels, strides):
            layers += [
                nn.Conv2d(previous, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(previous, output_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(images).amax(dim=(2, 3)))
