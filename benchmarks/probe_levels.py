"""Which level of the tiny preset's frozen EfficientNet-Lite0 says what the emoji world's captions name?

For every reduction level (1-5, and 6 = the 1280-channel head) an MLP probe is trained on the level's
spatially averaged features of emoji-world training scenes and tested on the test split, whose
(emoji, colour) pairs never occur in training. Prints background-colour and emoji-identity accuracy per
level. This is why the tiny tokenizer reads levels 4 and 5 beside the head (`VisionConfig.extra_levels`):
the head alone reads the background of unseen pairs at ~80%.

    python benchmarks/probe_levels.py [--train 8000] [--test data/emoji-test]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from seedtok.config import preset
from seedtok.data.sources import open_source
from seedtok.data.transforms import preprocess
from seedtok.train.decoder import build_teacher


@torch.inference_mode()
def level_means(vision, config, samples, batch: int = 200) -> dict[int, torch.Tensor]:
    out: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(samples), batch):
        images = [s.image for s in samples[start:start + batch]]
        x = preprocess(images, config.image_size, config.image_mean, config.image_std, config.resample)
        for name, fmap in vision.model.extract_endpoints(x).items():
            out.setdefault(int(name.rsplit("_", 1)[1]), []).append(fmap.mean((2, 3)))
    return {level: torch.cat(parts) for level, parts in out.items()}


def probe(x_train, y_train, x_test, y_test, classes: int, steps: int = 400, seed: int = 0) -> float:
    """Test accuracy (%) of a one-hidden-layer MLP on standardised features (input noise, dropout)."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    mlp = nn.Sequential(nn.Linear(x_train.shape[1], 512), nn.GELU(), nn.Dropout(0.2), nn.Linear(512, classes))
    opt = torch.optim.Adam(mlp.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (256,))
        loss = F.cross_entropy(mlp(x_train[idx] + 0.3 * torch.randn_like(x_train[idx])), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    mlp.eval()
    with torch.no_grad():
        return 100.0 * (mlp(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=8000, help="training scenes (emoji:train:N)")
    parser.add_argument("--test", default="data/emoji-test", help="test data spec")
    args = parser.parse_args()
    config = preset("tiny")
    vision = build_teacher(config)
    train, test = list(open_source(f"emoji:train:{args.train}")), list(open_source(args.test))
    colours = sorted({s.meta["background"] for s in train + test})
    emoji = {name: i for i, name in enumerate(sorted({s.meta["emoji"] for s in train + test}))}
    labels = {
        "background": (lambda ss: torch.tensor([colours.index(s.meta["background"]) for s in ss]), len(colours)),
        "emoji": (lambda ss: torch.tensor([emoji[s.meta["emoji"]] for s in ss]), len(emoji)),
    }
    f_train, f_test = level_means(vision, config, train), level_means(vision, config, test)
    print(f"MLP probes on EfficientNet-Lite0 level means: {len(train)} training scenes, {len(test)} test scenes "
          f"(unseen emoji-colour pairs)")
    print("| level | channels | background % | emoji % |")
    print("|---|---|---|---|")
    for level in sorted(f_train):
        accs = [probe(f_train[level], fn(train), f_test[level], fn(test), n) for fn, n in labels.values()]
        print(f"| {level}{' (head)' if level == max(f_train) else ''} | {f_train[level].shape[1]} | "
              f"{accs[0]:.1f} | {accs[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
