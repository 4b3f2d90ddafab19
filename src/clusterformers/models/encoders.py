"""Encoder and projection head for the fair contrastive experiments (CCLK-release ``models/lenet.py``).

``LeNetEncoder``: conv 3→6→16→120 (5×5, tanh), 2×2 average pooling after the first two, linear 120→84, for
32×32 RGB inputs. ``LinearCritic`` (SimCLR-style head of CCLK's ``critic.py``): Linear(84, 84, no bias) →
BatchNorm → ReLU → Linear(84, 128, no bias) → BatchNorm(affine=False). The losses L2-normalise the head's
output themselves; the linear probes read the 84-d encoder output (see docs/fare.md).
"""

from __future__ import annotations

from torch import Tensor, nn


class LeNetEncoder(nn.Module):
    """LeNet-5 style encoder: ``[B, 3, 32, 32]`` → ``[B, 84]``.

    Args:
        in_channels: input channels (3 for ColorMNIST).
    """

    representation_dim = 84

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.conv3 = nn.Conv2d(16, 120, kernel_size=5)
        self.fc = nn.Linear(120, self.representation_dim)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.act = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, C, 32, 32]`` → representation ``[B, 84]``."""
        if x.dim() != 4 or x.shape[-2:] != (32, 32):
            raise ValueError(f"x must be [B, C, 32, 32] images, got shape {list(x.shape)}")
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = self.act(self.conv3(x))
        return self.fc(x.flatten(1))


class LinearCritic(nn.Module):
    """Projection head ``[B, latent_dim]`` → ``[B, projection_dim]`` (unnormalised).

    Args:
        latent_dim: encoder output width (84).
        projection_dim: head output width (128).
    """

    def __init__(self, latent_dim: int = 84, projection_dim: int = 128) -> None:
        super().__init__()
        self.w1 = nn.Linear(latent_dim, latent_dim, bias=False)
        self.bn1 = nn.BatchNorm1d(latent_dim)
        self.relu = nn.ReLU()
        self.w2 = nn.Linear(latent_dim, projection_dim, bias=False)
        self.bn2 = nn.BatchNorm1d(projection_dim, affine=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.bn2(self.w2(self.relu(self.bn1(self.w1(h)))))


class ContrastiveNet(nn.Module):
    """Encoder plus head: ``forward(x)`` → ``(h [B, 84], z [B, 128])``; ``encode(x)`` → ``h`` only.

    Args:
        encoder: defaults to :class:`LeNetEncoder`.
        head: defaults to :class:`LinearCritic` on the encoder's ``representation_dim``.
    """

    def __init__(self, encoder: nn.Module | None = None, head: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder if encoder is not None else LeNetEncoder()
        dim = getattr(self.encoder, "representation_dim", 84)
        self.head = head if head is not None else LinearCritic(dim)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return h, self.head(h)
