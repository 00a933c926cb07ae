"""The plain PyTorch pipeline the fast path is measured against: PIL transforms in a DataLoader, eager fp32.

This is what a CIFAR-10 tutorial does: torchvision's CIFAR10 data set (here from in-memory
images instead of the pickles, so synthetic data works too), per-image PIL augmentation in
worker processes, and a training step that reads the loss back every step.
"""
from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ablate.data import MEAN, STD


class InMemoryCIFAR(Dataset):
    """torchvision's CIFAR10 without the files: HWC uint8 images turned into PIL images one by one."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.data = x.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3), like CIFAR10.data
        self.targets = y.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def train_transform() -> T.Compose:
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def test_transform() -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])


def make_loader(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, workers: int, train: bool,
                device: torch.device, seed: int = 0) -> DataLoader:
    """Shuffled, augmented batches for training (last partial batch dropped, as the fast path does)."""
    return DataLoader(InMemoryCIFAR(x, y, train_transform() if train else test_transform()),
                      batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def train_epoch(model: nn.Module, loader: DataLoader, *, loss_fn: nn.Module,
                optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, float]:
    """One eager fp32 pass; returns mean loss, accuracy and the number of images."""
    model.train()
    total, correct, seen = 0.0, 0, 0
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(inputs)
        loss = loss_fn(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(targets)  # the usual per-step .item(): one host sync per step
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    return {"loss": total / seen, "acc": correct / seen, "images": seen}


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = seen = 0
    for inputs, targets in loader:
        logits = model(inputs.to(device))
        correct += (logits.argmax(1).cpu() == targets).sum().item()
        seen += len(targets)
    return correct / seen
