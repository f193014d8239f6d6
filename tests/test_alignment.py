"""Classifier alignment: per-class Gaussians (statistics, never images) and the head retrained on samples
of every seen class after each task."""

from __future__ import annotations

import pytest
import torch

from promptcil.features import backbone_statistics
from promptcil.heads.alignment import AlignConfig, ClassGaussians
from promptcil.heads.linear import LinearHead

from conftest import DigitsTasks, Interrupted, interrupt_after, make_params, train_run


def test_gaussians_hold_class_means_and_the_top_of_each_covariance():
    generator = torch.Generator().manual_seed(0)
    dim, rank = 6, 2
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    samples = [torch.randn(400, dim, generator=generator, dtype=torch.float64) @ mixing + shift for shift in (0.0, 3.0)]
    gaussians = ClassGaussians(dim, rank).double()
    features, labels = torch.cat(samples), torch.tensor([0] * 400 + [1] * 400)
    for chunk in torch.arange(800).split(150):  # several batches, as the trainer shows them
        gaussians.observe(features[chunk], labels[chunk], 2)
    gaussians.end_task(2)
    for c, x in enumerate(samples):
        torch.testing.assert_close(gaussians.means[c], x.mean(0))
        covariance = torch.cov(x.T)
        eigenvalues, vectors = torch.linalg.eigh(covariance)
        top = vectors[:, -rank:] @ torch.diag(eigenvalues[-rank:]) @ vectors[:, -rank:].T
        torch.testing.assert_close(gaussians.factors[c] @ gaussians.factors[c].T, top)
        torch.testing.assert_close(gaussians.residual_std[c] ** 2, eigenvalues[:-rank].mean())
    torch.manual_seed(0)
    drawn, drawn_labels = gaussians.sample(20000)
    assert drawn.shape == (40000, dim) and drawn_labels.bincount().tolist() == [20000, 20000]
    for c in range(2):
        x = drawn[drawn_labels == c]
        torch.testing.assert_close(x.mean(0), gaussians.means[c], atol=0.1, rtol=0)
        model = gaussians.factors[c] @ gaussians.factors[c].T + gaussians.residual_std[c] ** 2 * torch.eye(dim)
        torch.testing.assert_close(torch.cov(x.T), model, atol=0.15 * float(model.diagonal().max()), rtol=0)


def test_a_class_needs_two_samples_and_only_the_current_task_is_observed():
    gaussians = ClassGaussians(4, 2)
    gaussians.observe(torch.randn(3, 4), torch.tensor([0, 0, 1]), 2)
    with pytest.raises(ValueError, match="at least 2 training samples"):
        gaussians.end_task(2)
    gaussians = ClassGaussians(4, 2)
    gaussians.observe(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]), 2)
    gaussians.end_task(2)
    gaussians.observe(torch.randn(4, 4), torch.tensor([2, 2, 3, 1]), 2)  # label 1 is an earlier task's
    with pytest.raises(ValueError, match="outside the current task"):  # counted on the device, reported here
        gaussians.end_task(2)


def test_the_state_is_per_class_statistics_of_fixed_size():
    """(rank + 1) x D + 1 float32 numbers per class, whatever the number of images: at D = 768 and rank 8,
    27 652 bytes per class, 26.4 MiB for 1 000 classes (a full covariance: 2.2 GiB)."""
    dim, rank = 768, 8
    sizes = []
    for images in (20, 200):
        gaussians = ClassGaussians(dim, rank)
        gaussians.observe(torch.randn(images * 3, dim), torch.arange(3).repeat_interleave(images), 3)
        gaussians.end_task(3)
        sizes.append(sum(t.numel() * t.element_size() for t in gaussians.state_dict().values()))
    assert sizes[0] == sizes[1] == 3 * ((rank + 1) * dim + 1) * 4
    assert 1000 * sizes[0] / 3 / 2**20 == pytest.approx(26.4, abs=0.05)
    assert 1000 * dim * dim * 4 / 2**30 == pytest.approx(2.2, abs=0.01)


def test_aligned_linear_head_beats_the_masked_one_on_frozen_features(pretrained_backbone, digits_tasks: DigitsTasks):
    """The task-recency bias it removes: trained task by task with earlier logits masked, the newest
    classes never meet the old ones in a softmax; alignment puts them in one."""
    stats = backbone_statistics(pretrained_backbone, digits_tasks.train, 256, torch.device("cpu"))
    test = backbone_statistics(pretrained_backbone, digits_tasks.test, 256, torch.device("cpu"))
    split = digits_tasks.split
    accuracy = {}
    for aligned in (False, True):
        torch.manual_seed(0)
        head = LinearHead(stats["cls"].shape[1], AlignConfig(enabled=aligned))
        for t in range(split.num_tasks):
            classes = list(split.task_classes(t))
            head.add_classes(len(classes))
            mask = torch.isin(stats["labels"], torch.tensor(classes))
            x, y = stats["cls"][mask], stats["labels"][mask]
            optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
            for _ in range(5):
                for batch in torch.randperm(len(y)).split(32):
                    loss = head.loss(x[batch], y[batch], classes[0])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            if head.observes:
                head.eval()
                head.observe(x, y)
                head.end_task()
        with torch.no_grad():
            accuracy[aligned] = (head(test["cls"]).argmax(1) == test["labels"]).float().mean().item()
    assert accuracy[True] > accuracy[False] + 0.1, accuracy


@pytest.mark.parametrize("head", ["linear", "cat"])
def test_aligned_heads_resume_bit_identically(head, random_backbone, digits_tasks, tmp_path):
    params = make_params(method={"name": "apt"}, head={"name": head}, train={"epochs": 2})
    reference = train_run(params, random_backbone, digits_tasks, tmp_path / "straight").trainable_state()
    assert reference["head.gaussians.means"].shape == (10, 48)
    with pytest.raises(Interrupted):
        train_run(params, random_backbone, digits_tasks, tmp_path / "resumed", on_epoch_end=interrupt_after(2, 0))
    resumed = train_run(params, random_backbone, digits_tasks, tmp_path / "resumed").trainable_state()
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
