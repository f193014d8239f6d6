"""The joint upper bound: the same head fitted on all classes at once, on the final model's features."""

from __future__ import annotations

import torch

from promptcil.config.schema import HeadConfig
from promptcil.config.sections import TrainConfig
from promptcil.data import ImageSet
from promptcil.evaluation.accuracy import features_of
from promptcil.heads import Head, create_head
from promptcil.heads.ensemble import EnsembleHead
from promptcil.model import IncrementalModel
from promptcil.training import make_optimizer
from promptcil.training.step import set_epoch_lr


def joint_upper_bound(
    model: IncrementalModel, head_cfg: HeadConfig, train_cfg: TrainConfig, train_set: ImageSet, test_set: ImageSet,
    batch_size: int, device: torch.device,
) -> float:
    """A_last's ceiling on these features: a fresh head of the model's kind fitted on ALL classes of
    `train_set` at once (joint training, so no alignment), on the features the model has now (the frozen
    backbone's, the first-task-adapted prompt's, or the last task's prompt), scored on `test_set`.
    Analytic heads (prototype, ridge) are exact, so for them the bound equals A_last."""
    # (members, N, D), kept on the device for the head's many small steps (a gather and a copy per step otherwise)
    train_features = features_of(model, train_set, batch_size, device).to(device)
    test_features = features_of(model, test_set, batch_size, device).to(device)
    members, _, dim = train_features.shape
    cfg = head_cfg.model_copy(update={"align": head_cfg.align.model_copy(update={"enabled": False})})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)
        heads = [create_head(cfg, dim) for _ in range(members)]
        head: Head = (heads[0] if members == 1 else EnsembleHead(heads)).to(device)  # before it grows: its
        head.add_classes(int(train_set.labels.max()) + 1)  # running sums are made on its device
    labels = train_set.labels.to(device)

    def rows(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return features[:, index.to(device)].reshape(-1, dim)  # member-major, as the model emits them

    def show(training: bool) -> None:
        head.train(training)
        order = torch.arange(len(labels))
        for index in order.split(batch_size):
            head.observe(rows(train_features, index), labels[index.to(device)])
        head.end_task()

    if head.observes_before_training:
        show(training=True)
    if head.trainable:
        optimizer = make_optimizer(train_cfg, head.param_groups())
        generator = torch.Generator().manual_seed(train_cfg.seed)
        head.train()
        for epoch in range(train_cfg.epochs):
            set_epoch_lr(optimizer, train_cfg, epoch)
            for index in torch.randperm(len(labels), generator=generator).split(train_cfg.batch_size):
                loss = head.loss(rows(train_features, index), labels[index.to(device)], 0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    if head.observes:
        with torch.no_grad():
            show(training=False)
    head.eval()
    with torch.no_grad():
        predictions = torch.cat([head(rows(test_features, index)).argmax(1)
                                 for index in torch.arange(len(test_set)).split(batch_size)]).cpu()
    return (predictions == test_set.labels).float().mean().item()
