"""Prompt-consistency metrics: CLIPScore and VQAScore, per image, from local weights.

- `CLIPScore`: 100 * max(cos(image, text), 0) with a CLIP model (e.g. ViT-L/14) loaded from a local
  folder through transformers (torchmetrics' convention; the paper reports ~26 for COCO). Written on
  transformers directly rather than torchmetrics' CLIPScore so that scores stay per image, weights
  load with local_files_only, and batches stream with their own prompts.
- `VQAScorer`: the pluggable interface, P("Yes" | image, "Does this figure show "{text}"? ...").
  `T2VMetricsVQAScore` adapts t2v_metrics' CLIP-FlanT5 (the paper's VQAScore) when that package
  and its weights (a local Hugging Face cache folder) exist; any other scorer (a test's stand-in, an
  API model) subclasses `VQAScorer` and is chosen by `_target_` in configs/evaluate.yaml.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from models.runtime import ConfigError

__all__ = ["DEFAULT_QUESTION", "CLIPScore", "T2VMetricsVQAScore", "VQAScorer"]

DEFAULT_QUESTION = 'Does this figure show "{}"? Please answer yes or no.'


def _pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB") for img in images]


def _folder_digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    parts = [(str(p.relative_to(path)), p.stat().st_size) for p in files]
    config = path / "config.json"
    if config.is_file():
        parts.append(("config", config.read_text()))
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:8]


class CLIPScore:
    """Per-image CLIPScore with a CLIP model from a local folder (`CLIPModel` + its processor)."""

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", max_length: int = 77):
        if not path:
            raise ConfigError("clip_score.path: set it to a local CLIP folder (e.g. clip-vit-large-patch14)")
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"clip_score.path={path}: no such folder. Save a CLIP model there with "
                "`CLIPModel.from_pretrained(...).save_pretrained(dir)` and its processor likewise"
            )
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(self.device)
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.max_length = max_length
        self.identity = f"clip-{folder.name}-{_folder_digest(folder)}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, texts: list[str]) -> Tensor:
        """uint8 (N, H, W, C) images and N prompts -> (N,) scores in [0, 100]."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} prompts")
        inputs = self.processor(
            text=list(texts), images=_pil(images), return_tensors="pt", padding=True, truncation=True,
            max_length=self.max_length,
        ).to(self.device)  # fmt: skip
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img = getattr(img, "pooler_output", img)  # transformers 5 may return an output object
        txt = getattr(txt, "pooler_output", txt)
        return 100.0 * F.cosine_similarity(img.float(), txt.float(), dim=-1).clamp_min(0).cpu()


class VQAScorer:
    """Interface: `__call__(uint8 (N, H, W, C) images, N prompts) -> (N,) probabilities in [0, 1]`.

    `identity` names the scorer (model + weights) in metrics records, like a feature extractor's.
    """

    identity: str = "vqa"

    def __init__(self, question_template: str = DEFAULT_QUESTION):
        if "{}" not in question_template:
            raise ConfigError(
                f"vqa_score.question_template must contain '{{}}' for the prompt, got {question_template!r}"
            )
        self.question_template = question_template

    def questions(self, texts: list[str]) -> list[str]:
        return [self.question_template.format(t) for t in texts]

    def __call__(self, images: np.ndarray, texts: list[str]) -> Tensor:
        raise NotImplementedError


class T2VMetricsVQAScore(VQAScorer):
    """t2v_metrics' VQAScore (CLIP-FlanT5) with weights from a local Hugging Face cache folder.

    `cache_dir` must hold the model (zhiqiulin/clip-flant5-xxl) and its tokenizer (google/flan-t5-xxl)
    as t2v_metrics downloads them; HF_HUB_OFFLINE is set so nothing is fetched at run time.
    """

    def __init__(
        self,
        model: str = "clip-flant5-xxl",
        cache_dir: str | None = None,
        device: str | torch.device = "cuda",
        question_template: str = DEFAULT_QUESTION,
        answer_template: str = "Yes",
    ):
        super().__init__(question_template)
        try:
            import t2v_metrics
        except ImportError as err:
            raise ConfigError(
                "vqa_score with t2v_metrics needs the package: pip install t2v-metrics (and its CLIP-FlanT5 weights "
                "in vqa_score.cache_dir); or choose another scorer with vqa_score._target_=..."
            ) from err
        if not cache_dir or not Path(str(cache_dir)).expanduser().is_dir():
            raise FileNotFoundError(
                f"vqa_score.cache_dir={cache_dir}: no such folder; it must hold the {model} weights as a Hugging "
                "Face cache (download them once on a machine with network)"
            )
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.scorer = t2v_metrics.VQAScore(model=model, device=str(device), cache_dir=str(cache_dir))
        self.answer_template = answer_template
        self.identity = f"t2v-{model}"

    def __call__(self, images: np.ndarray, texts: list[str]) -> Tensor:
        # Paired scores: the model's forward takes (image_i, text_i) pairs and accepts PIL images.
        # t2v_metrics formats the question itself, so it gets the template, not formatted questions.
        scores = self.scorer.model.forward(
            images=_pil(images), texts=list(texts), question_template=self.question_template,
            answer_template=self.answer_template,
        )  # fmt: skip
        return scores.float().cpu()
