"""CLIPScore with a tiny CLIP saved to disk; the VQAScore interface with a tiny stand-in model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from eval.text_metrics import CLIPScore, T2VMetricsVQAScore, VQAScorer
from models.runtime import ConfigError


class TinyVQA(VQAScorer):
    """A stand-in VQA model: P(yes) = softmax(W [mean R, mean G, mean B, len(question) / 100] + b)[yes]."""

    identity = "tiny-vqa"

    def __init__(self, question_template: str = 'Does this figure show "{}"? Please answer yes or no.', seed: int = 0):
        super().__init__(question_template)
        torch.manual_seed(seed)
        self.head = nn.Linear(4, 2)  # logits for (no, yes)

    def inputs(self, images: np.ndarray, texts: list[str]) -> torch.Tensor:
        pixels = torch.from_numpy(images).float().mean(dim=(1, 2)) / 255  # (N, C)
        pixels = pixels.expand(-1, 3) if pixels.shape[1] == 1 else pixels
        lengths = torch.tensor([[len(q) / 100] for q in self.questions(texts)])
        return torch.cat([pixels, lengths], dim=1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, texts: list[str]) -> torch.Tensor:
        return self.head(self.inputs(images, texts)).softmax(-1)[:, 1]


def make_tiny_clip(folder) -> str:
    """A randomly initialised CLIP (+ tokenizer and image processor) in save_pretrained layout."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    out = folder / "clip"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_is_100_times_the_clipped_cosine(tiny_clip):
    from transformers import AutoProcessor, CLIPModel

    images = np.random.default_rng(0).integers(0, 256, size=(4, 20, 20, 3), dtype=np.uint8)
    texts = ["a cat", "dog", "zebra on grass", "a"]
    scores = CLIPScore(tiny_clip)(images, texts)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    proc = AutoProcessor.from_pretrained(tiny_clip)
    inputs = proc(text=texts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    torch.testing.assert_close(scores, 100 * cos.clamp_min(0), rtol=1e-4, atol=1e-4)
    assert scores.shape == (4,) and (scores >= 0).all() and (scores <= 100).all()
    grey = CLIPScore(tiny_clip)(images[..., :1], texts)  # grey samples are scored as RGB
    assert grey.shape == (4,)


def test_clip_score_needs_a_local_folder():
    with pytest.raises(ConfigError, match="clip_score.path"):
        CLIPScore(None)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        CLIPScore("/no/clip")


def test_vqa_interface_with_a_stand_in_model():
    scorer = TinyVQA()
    images = np.random.default_rng(1).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    texts = ["a red cube", "two dogs", "x"]
    p = scorer(images, texts)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    assert scorer.questions(["cat"]) == ['Does this figure show "cat"? Please answer yes or no.']
    expected = scorer.head(scorer.inputs(images, texts)).softmax(-1)[:, 1]
    torch.testing.assert_close(p, expected.detach())
    with pytest.raises(ConfigError, match="must contain"):
        TinyVQA(question_template="no placeholder")


def test_t2v_metrics_adapter_says_what_is_missing(tmp_path):
    try:
        import t2v_metrics  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install t2v-metrics"):
            T2VMetricsVQAScore(cache_dir=str(tmp_path))
    else:  # installed: the weights folder is still required
        with pytest.raises(FileNotFoundError, match="vqa_score.cache_dir"):
            T2VMetricsVQAScore(cache_dir=str(tmp_path / "missing"))
