"""Display helpers shared by the walkthrough notebooks (imported from the notebooks' own folder)."""
from __future__ import annotations

import io

import matplotlib.pyplot as plt
import PIL.Image
from IPython.display import Image, display


def show(fig, photo: bool = False) -> None:
    """Display a figure, stored compactly in the notebook: plots as 256-colour PNG, photographs as JPEG."""
    buf = io.BytesIO()
    if photo:
        fig.savefig(buf, format="jpeg", bbox_inches="tight", pil_kwargs={"quality": 80})
    else:
        png = io.BytesIO()
        fig.savefig(png, format="png", bbox_inches="tight")
        PIL.Image.open(png).convert("RGB").quantize(256).save(buf, format="PNG", optimize=True)
    plt.close(fig)
    display(Image(buf.getvalue()))


def rgb(img):
    """``[3, H, W]`` tensor → ``[H, W, 3]`` array in [0, 1] for ``imshow``."""
    return img.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy()
