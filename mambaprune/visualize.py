"""Pictures of what pruning keeps: kept-token maps drawn over the input images (matplotlib)."""
from __future__ import annotations

import math
from pathlib import Path

import torch


def patch_mask(kept: torch.Tensor, protected: list, token_length: int) -> torch.Tensor:
    """(batch, K) kept token positions -> (batch, patches) bool, patches = token_length - class tokens.

    Class tokens (``protected`` positions) are dropped and the patch tokens after them shifted back
    into patch order.
    """
    protected_t = torch.tensor(sorted(protected), dtype=torch.long)
    before = (kept[..., None] > protected_t).sum(-1) if len(protected) else torch.zeros_like(kept)
    is_patch = ~torch.isin(kept, protected_t)
    mask = torch.zeros(kept.shape[0], token_length - len(protected), dtype=torch.bool)
    for row in range(kept.shape[0]):
        mask[row, (kept[row] - before[row])[is_patch[row]]] = True
    return mask


def plot_kept_tokens(pictures: torch.Tensor, kept_by_site: dict, report, path, titles=None) -> Path:
    """One row per image: the image, then the patches still kept after each site (pruned ones dimmed).

    pictures: (n, H, W, 3) in [0, 1]; kept_by_site: {site: (n, K) positions} from
    ``PrunedModel.kept_positions``; report: the PrunedModel's report. The patch grid of each site's
    stage must be square.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count, height = pictures.shape[0], pictures.shape[1]
    sites = sorted(kept_by_site)
    fig, axes = plt.subplots(count, len(sites) + 1, figsize=(2.1 * (len(sites) + 1), 2.1 * count), squeeze=False)
    for row in range(count):
        axes[row, 0].imshow(pictures[row].numpy())
        axes[row, 0].set_title(titles[row] if titles else "input", fontsize=8)
        for col, site in enumerate(sites, start=1):
            kept = kept_by_site[site][row:row + 1]
            length = report.site_lengths.get(site, report.token_length)
            protected = report.protected if length == report.token_length else []  # class tokens: first stage
            side = math.isqrt(length - len(protected))
            mask = patch_mask(kept, protected, length)[0].reshape(side, side).float()
            scale = height // side
            shade = mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1)[..., None]
            axes[row, col].imshow((pictures[row] * (0.2 + 0.8 * shade)).numpy())
            axes[row, col].set_title(f"before block {site}: {kept.shape[1]} kept", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
