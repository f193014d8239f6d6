"""The features stage's statistics: per-class sums of a size that does not grow with the images, whose
means are exactly the per-image path's class means and layer affinity."""

from __future__ import annotations

import torch

from promptcil.data import ImageSet
from promptcil.features import backbone_statistics, class_means, class_statistics, layer_affinity, means_of

from conftest import tiny_random_backbone

CPU = torch.device("cpu")


def test_class_statistics_give_the_per_image_means_exactly(digits_tasks):
    backbone = tiny_random_backbone()
    data, base = digits_tasks.train, digits_tasks.split.task_classes(0)
    num_classes = int(data.labels.max()) + 1
    sums = class_statistics(backbone, data, 64, CPU, num_classes=num_classes, affinity_classes=base)
    per_image = backbone_statistics(backbone, data, 64, CPU)
    means = means_of(sums)
    assert torch.equal(sums["class_counts"], torch.bincount(data.labels, minlength=num_classes).double())
    assert torch.equal(means["class_features"], class_means(per_image["cls"], data.labels, num_classes))
    assert torch.equal(means["block_class_tokens"],
                       class_means(per_image["block_input_tokens"], data.labels, num_classes).transpose(0, 1))
    in_base = torch.isin(data.labels, torch.as_tensor(list(base)))
    assert sums["affinity_images"].item() == in_base.sum().item()
    torch.testing.assert_close(means["layer_affinity"], layer_affinity(per_image["block_input_tokens"][in_base]))


def test_their_size_does_not_grow_with_the_images(digits_tasks):
    backbone = tiny_random_backbone()
    data = digits_tasks.train
    tripled = ImageSet(data.images.repeat(3, 1, 1, 1), data.labels.repeat(3), data.class_names)
    once, thrice = (class_statistics(backbone, d, 256, CPU, num_classes=10, affinity_classes=range(4))
                    for d in (data, tripled))
    assert {k: v.shape for k, v in once.items()} == {k: v.shape for k, v in thrice.items()}
    assert sum(v.numel() for v in once.values()) < 10 * 5 * 48 + 50  # classes x (depth + 1) x D, plus the small ones
    torch.testing.assert_close(thrice["class_cls_sums"], 3 * once["class_cls_sums"])
    torch.testing.assert_close(means_of(thrice)["layer_affinity"], means_of(once)["layer_affinity"])
