"""Show, Attend and Tell (Xu et al. 2015) on attn-fast's additive attention: a small CNN encoder and an LSTM
decoder with soft attention, the f_beta gate and the doubly stochastic regularization (`model`), trained on
generated scenes of coloured shapes with captions such as "a red circle above a blue square" (`data`: no
download, deterministic from a seed), an attention-grounding score against its chance level (`metrics`), per-word
attention overlays (`plots`), and what the shared training loop needs to train it, behind `attn-fast
train-captions` (`train`).
"""
from attn_fast.examples.captioning.data import (
    Scene,
    Shape,
    WordVocab,
    load_png,
    make_scene_splits,
    render_images,
    render_scene,
    save_png,
)
from attn_fast.examples.captioning.metrics import grounding_score
from attn_fast.examples.captioning.model import CaptionDecoder, Captioner, ImageEncoder, doubly_stochastic_penalty
from attn_fast.examples.captioning.plots import attention_overlay
from attn_fast.examples.captioning.train import (
    CaptionTrainConfig,
    CaptionTrainResult,
    caption_images,
    evaluate,
    load_checkpoint,
    train,
)

__all__ = ["CaptionDecoder", "CaptionTrainConfig", "CaptionTrainResult", "Captioner", "ImageEncoder", "Scene",
           "Shape", "WordVocab", "attention_overlay", "caption_images", "doubly_stochastic_penalty", "evaluate",
           "grounding_score", "load_checkpoint", "load_png", "make_scene_splits", "render_images", "render_scene",
           "save_png", "train"]
