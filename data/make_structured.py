"""Draw the three procedural colour exemplars with long-range structure (``veins.png``, ``stripes.png``,
``bricks.png``, 256×256 RGB): the structured textures that synthesis must keep connected.

The photographs bundled here are either grey (``brick.png``) or stochastic; these images are drawn from
seeded random numbers by this script alone, so the project dedicates them to the public domain (CC0; see
``data/README.md``). Rerun with ``python data/make_structured.py`` (from the repository root): the files
are reproduced bit for bit on one machine.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

SIZE = 256
HERE = Path(__file__).resolve().parent


def smooth_noise(g: torch.Generator, cells: int, size: int = SIZE, channels: int = 1) -> torch.Tensor:
    """``[channels, size, size]`` noise in [-1, 1]: a ``cells × cells`` random grid, bicubically upsampled."""
    grid = torch.rand(1, channels, cells + 3, cells + 3, generator=g) * 2 - 1
    up = F.interpolate(grid, size=(size + 3 * size // cells,) * 2, mode="bicubic", align_corners=False)
    return up[0, :, :size, :size].clamp(-1, 1)


def colour(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255


def veins(g: torch.Generator) -> torch.Tensor:
    """A leaf: green cells between pale connected veins (borders of a domain-warped Voronoi diagram), with a
    second, finer network of thinner veins inside the cells."""
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                          indexing="ij")
    warp = 9 * smooth_noise(g, 6, channels=2)
    px, py = x + warp[0], y + warp[1]

    def borders(n_seeds: int, width: float) -> torch.Tensor:
        seeds = torch.rand(n_seeds, 2, generator=g) * SIZE
        d = ((px[None] - seeds[:, 0, None, None]) ** 2 + (py[None] - seeds[:, 1, None, None]) ** 2).sqrt()
        two = d.topk(2, dim=0, largest=False).values
        return torch.exp(-(((two[1] - two[0]) / width) ** 2))

    main, fine = borders(18, 2.2), borders(90, 0.9)
    shade = 0.5 + 0.5 * smooth_noise(g, 4)
    leaf = colour((46, 102, 38)) * (1 - shade) + colour((92, 150, 52)) * shade
    leaf = leaf * (1 + 0.06 * smooth_noise(g, 64))
    img = leaf * (1 - 0.45 * fine) + colour((150, 190, 90)) * 0.45 * fine
    img = img * (1 - main) + colour((214, 226, 150)) * main
    return img.clamp(0, 1)


def stripes(g: torch.Generator) -> torch.Tensor:
    """Woven fabric: parallel wavy stripes of four colours and varying widths at 25°, with a fine weave."""
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                          indexing="ij")
    theta = math.radians(25)
    u = x * math.cos(theta) + y * math.sin(theta) + 5 * torch.sin(2 * math.pi * (y * math.cos(theta)
                                                                                - x * math.sin(theta)) / 140)
    widths = 7 + 13 * torch.rand(80, generator=g)
    edges = torch.cumsum(widths, 0) - 200
    index = torch.bucketize(u, edges)
    palette = torch.stack([colour(c)[:, 0, 0] for c in ((24, 62, 102), (222, 206, 170), (176, 64, 40),
                                                           (52, 128, 120))])
    kinds = torch.randint(0, 4, (81,), generator=g)
    kinds[1:] = torch.where(kinds[1:] == kinds[:-1], (kinds[1:] + 1) % 4, kinds[1:])  # neighbours differ
    img = palette[kinds[index]].permute(2, 0, 1)
    weave = 0.05 * torch.sin(2 * math.pi * x / 3) * torch.sin(2 * math.pi * y / 3)
    return (img * (1 + weave + 0.04 * smooth_noise(g, 48))).clamp(0, 1)


def bricks(g: torch.Generator) -> torch.Tensor:
    """A red brick wall in running bond: per-brick colour, mortar joints, speckle and worn edges."""
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                          indexing="ij")
    height, width, joint = 26.0, 58.0, 4.0
    row = torch.floor(y / height)
    shifted = x + (row % 2) * width / 2
    col = torch.floor(shifted / width)
    in_y, in_x = y - row * height, shifted - col * width
    edge = torch.minimum(torch.minimum(in_y, height - in_y), torch.minimum(in_x, width - in_x))
    mortar = (edge < joint / 2).float()
    brick_id = (row * 97 + col * 13).long() % 251
    tint = torch.rand(251, 3, generator=g)
    base = colour((150, 58, 38))[:, 0, 0] + (tint - 0.5) * torch.tensor([0.22, 0.12, 0.08])
    img = base[brick_id].permute(2, 0, 1) * (1 + 0.12 * smooth_noise(g, 40, channels=1))
    img = img * (0.85 + 0.15 * (edge / 6).clamp(0, 1))
    grout = colour((176, 168, 150)) * (1 + 0.08 * smooth_noise(g, 64))
    return (img * (1 - mortar) + grout * mortar).clamp(0, 1)


def main() -> None:
    from imgmw.image import save_image

    for name, draw, seed in (("veins", veins, 11), ("stripes", stripes, 12), ("bricks", bricks, 13)):
        save_image(draw(torch.Generator().manual_seed(seed)), HERE / f"{name}.png")
        print(f"wrote {HERE / name}.png")


if __name__ == "__main__":
    main()
