"""open_clip's train step for an mmjax config: the peer side of `mmjax bench --against`.

The model is open_clip's CoCa (or CLIP) built from `mmjax.interop.open_clip.open_clip_config`,
the converter's mapping in reverse, so both sides train the same shape; the fields in which
open_clip's layout differs (its class token, one shared pooler, split decoder blocks) are
reported with the figures. The step is what open_clip's training loop does per batch in
f32: forward, CoCaLoss (ClipLoss for CLIP), backward, gradient-norm clipping, AdamW with the
config's hyper-parameters. The batch is mmjax's synthetic batch, pixels already normalised
(open_clip's loader hands the model float tensors).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from mmjax.interop.open_clip import open_clip_config
from mmjax.interop.torch_import import import_open_clip
from mmjax.models.config import ModelConfig


def check_config(config, model_cfg: ModelConfig) -> tuple[dict[str, Any], list[str]]:
    """open_clip_config(model_cfg), or ValueError/ConversionError in one line for what the
    open_clip side cannot train (needs no torch: the parent checks before any worker)."""
    if config.loss.contrastive != "softmax":
        raise ValueError(
            f"loss.contrastive={config.loss.contrastive!r}: open_clip's CoCa trains with "
            "the softmax loss only"
        )
    if model_cfg.dtype != "float32":
        raise ValueError(f"model.dtype={model_cfg.dtype!r}: the open_clip side runs f32")
    return open_clip_config(model_cfg)


@dataclasses.dataclass
class OpenClipStep:
    model_cfg: ModelConfig
    open_clip_config: dict[str, Any]
    differences: list[str]  # mmjax fields open_clip's layout changes.
    model: Any
    loss: Any
    optimizer: Any
    images: Any
    text: Any
    grad_clip: float
    threads: int

    @classmethod
    def build(cls, config, model_cfg: ModelConfig, batch: dict[str, np.ndarray], threads: int):
        torch, open_clip = import_open_clip()
        torch.set_num_threads(threads)
        oc, differences = check_config(config, model_cfg)
        torch.manual_seed(0)
        # The model's own arguments (open_clip.create_model takes preprocess_cfg aside).
        kwargs = {k: v for k, v in oc.items() if k not in ("preprocess_cfg", "custom_text")}
        if model_cfg.captioning:
            from open_clip.coca_model import CoCa

            model = CoCa(**kwargs)
            loss = open_clip.CoCaLoss(
                caption_loss_weight=config.loss.caption_weight,
                clip_loss_weight=config.loss.contrastive_weight,
            )
        else:
            from open_clip.model import CLIP

            model = CLIP(**kwargs, output_dict=True)
            loss = open_clip.ClipLoss()
        model.train()
        with torch.no_grad():  # open_clip leaves the decoder's head as torch.empty.
            for name, p in model.named_parameters():
                if name == "text_decoder.text_projection":
                    p.copy_(torch.randn_like(p) * p.shape[0] ** -0.5)
        opt = config.optimizer
        # open_clip's main.py: no decay on gains, biases and the logit scale.
        skip = lambda n, p: p.ndim < 2 or any(k in n for k in ("bn", "ln", "bias", "logit_scale"))
        decay = [p for n, p in model.named_parameters() if not skip(n, p)]
        rest = [p for n, p in model.named_parameters() if skip(n, p)]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": opt.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ],
            lr=opt.learning_rate,
            betas=(opt.b1, opt.b2),
            eps=opt.eps,
        )
        mean = np.asarray(model_cfg.image_mean, np.float32)
        std = np.asarray(model_cfg.image_std, np.float32)
        pixels = (batch["images"].astype(np.float32) / 255.0 - mean) / std
        images = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        tokens = batch["tokens"].astype(np.int64)
        # mmjax's context holds one slot more for a CoCa (its text tower's CLS position).
        text = torch.from_numpy(tokens[:, : oc["text_cfg"]["context_length"]].copy())
        return cls(model_cfg, oc, differences, model, loss, optimizer, images, text,
                   float(opt.grad_clip or 0.0), threads)  # fmt: skip

    def _forward_backward(self) -> float:
        import torch

        out = self.model(self.images, self.text)
        if self.model_cfg.captioning:
            parts = self.loss(**out, output_dict=True)
        else:
            parts = {"contrastive_loss": self.loss(**out)}
        total = sum(parts.values())
        total.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        return float(total.detach())

    def step(self) -> tuple[float, float]:
        """(seconds, loss) of one training step."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._forward_backward()
        self.optimizer.step()
        return time.perf_counter() - start, loss

    def counted_flops(self) -> float:
        """FLOPs of one forward + backward pass as torch's FlopCounterMode counts them."""
        from torch.utils.flop_counter import FlopCounterMode

        self.optimizer.zero_grad(set_to_none=True)
        counter = FlopCounterMode(display=False)
        with counter:
            self._forward_backward()
        self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())

    def params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))
