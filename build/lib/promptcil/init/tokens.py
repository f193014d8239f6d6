"""Ways to pick a few prompt slots out of many candidate tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_rows(rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` rows of `rows` at random: without replacement while there are enough, else with."""
    if count <= len(rows):
        return rows[torch.randperm(len(rows), generator=generator)[:count]].clone()
    return rows[torch.randint(len(rows), (count,), generator=generator)].clone()


def window_means(tokens: torch.Tensor, window: int) -> torch.Tensor:
    """(images, patches, D) -> (images * ceil(patches / window), D): means of consecutive tokens of one image."""
    pooled = F.avg_pool1d(tokens.transpose(1, 2), kernel_size=window, stride=window, ceil_mode=True)
    return pooled.transpose(1, 2).flatten(0, 1)


def kmeans_centres(tokens: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """SPT's token prototypes: `count` k-means centres of (n, D) tokens (scikit-learn, seeded)."""
    from sklearn.cluster import KMeans

    if count > len(tokens):
        raise ValueError(
            f"init.spt: {count} prompt slots need at least {count} tokens, the sample has {len(tokens)}; "
            "raise init.sample_images"
        )
    model = KMeans(n_clusters=count, random_state=seed, n_init=1).fit(tokens.double().numpy())
    return torch.from_numpy(model.cluster_centers_).float()
