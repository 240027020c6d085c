"""The handwritten digits with captions: the offline text-to-image quickstart's data.

Each digit image is paired with every caption template ("a handwritten seven", "the digit 7", "a 7
written by hand", ...), so the training stream sees each image under varied wordings, digits as
numerals and as words. The pairs are the dataset's items (image i // T with template i % T), so the
resumable infinite sampler of data/base.py shuffles and resumes them exactly like plain images.

Batches: {"x": (B, C, H, W) in [-1, 1], "y": (B,) the digit, "caption": list[str]}.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from data.digits import DigitsDataModule

__all__ = ["TEMPLATES", "WORDS", "CaptionedDigits", "DigitCaptionsDataModule", "caption"]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "a {digit} written by hand",
    "the number {word}",
    "a handwritten digit {word}",
    "{word}",
    "a scan of a handwritten {digit}",
    "the number {digit} written with a pen",
)


def caption(label: int, template: int) -> str:
    """The caption of digit `label` under template `template` (an index into TEMPLATES)."""
    return TEMPLATES[template].format(word=WORDS[label], digit=label)


class CaptionedDigits(Dataset):
    """(image, template) pairs. all_templates=False: one caption per image, template i % T (validation)."""

    def __init__(self, images: Tensor, labels: Tensor, all_templates: bool = True):
        self.images, self.labels = images, labels
        self.templates = len(TEMPLATES) if all_templates else 1

    def __len__(self) -> int:
        return len(self.images) * self.templates

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = i // self.templates
        template = i % self.templates if self.templates > 1 else i % len(TEMPLATES)
        label = int(self.labels[image])
        return {"x": self.images[image], "y": label, "caption": caption(label, template)}


class DigitCaptionsDataModule(DigitsDataModule):
    """The digits (same split as DigitsDataModule) with a caption per sample instead of a class label
    for the model: the MMDiT conditions on the text. `num_classes` stays 0 (no label embedding)."""

    def __init__(self, num_classes: int = 0, **kwargs: Any):
        if num_classes != 0:
            raise ValueError("digits with captions condition on text: data.num_classes must be 0")
        super().__init__(num_classes=0, **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        (xt, yt), (xv, yv) = self.split()
        self.train_set = CaptionedDigits(xt, yt, all_templates=True)
        self.val_set = CaptionedDigits(xv, yv, all_templates=False)
