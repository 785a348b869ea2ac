"""How well can each reader of the tiny ids name the emoji of an emoji-world scene?

Readers, all given only the 32 ids of each test scene (whose (emoji, colour) pairs never occur in training):

- the tiny decoder's coarse head: its logits over the 1,142 emoji prototypes (what the drawing shows);
- the tokenizer's caption scores (`SeedTokenizer.caption_scores`): the ids' contrastive feature against the
  caption of every emoji on every colour, the best colour per emoji (the decoder's text prior alone);
- both, as the decoder combines them (`TinyDecoderConfig.text_prior`, with the bundle's weight and temperature);
- with ``--train-ids DIR ...`` (folders from `seedtok extract-ids` on emoji-world training scenes): linear
  probes trained on those ids, one on the bag of ids (position-blind, as an LM's shared token rows start) and
  one on (position, id) pairs -- what a reader that learns from the ids could get without any pretrained help.

Prints top-1 / top-5 per reader (percent) and writes them to ``--json-out``; and, for the background colour, how
often the decoder's head (its learned colour nearest a named one), the caption scores per colour (the best emoji
on each) and both (as the decoder's ``text_prior_background`` combines them) name it.

    python benchmarks/identity_probe.py [--data data/emoji-test] [--train-ids runs/lm-ids/emoji-train-20000-s5 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from seedtok.data.emoji import PALETTE
from seedtok.data.sources import open_source
from seedtok.models.tokenizer import SeedTokenizer

_HERE = os.path.dirname(os.path.abspath(__file__))


def topk(scores: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    top = scores.topk(5, dim=-1).indices
    hit1, hit5 = top[:, 0] == truth, (top == truth[:, None]).any(-1)
    return 100.0 * hit1.float().mean().item(), 100.0 * hit5.float().mean().item()


def linear_probe(train_ids, train_y, test_ids, classes: int, positional: bool, epochs: int, seed: int = 0):
    """Softmax regression on the mean of one learned vector per id (or per (position, id)); Adam, batch 512."""
    torch.manual_seed(seed)
    codes = int(max(train_ids.max(), test_ids.max())) + 1
    positions = train_ids.shape[1]
    offsets = torch.arange(positions) * codes if positional else torch.zeros(positions, dtype=torch.long)
    bag = torch.nn.EmbeddingBag(codes * (positions if positional else 1), classes, mode="mean")
    torch.nn.init.zeros_(bag.weight)
    bias = torch.nn.Parameter(torch.zeros(classes))
    optimizer = torch.optim.Adam([*bag.parameters(), bias], lr=0.05 if positional else 0.02)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_ids)).split(512):
            loss = torch.nn.functional.cross_entropy(bag(train_ids[batch] + offsets) + bias, train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return bag(test_ids + offsets) + bias


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/emoji-test", help="emoji-world scenes (a `seedtok data emoji` folder)")
    parser.add_argument("--train-ids", nargs="*", default=[], help="ids folders of training scenes for the probes")
    parser.add_argument("--epochs", type=int, default=8, help="linear probes: passes over the training ids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", default=os.path.join(_HERE, "results", "identity-probe-tiny.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    source = open_source(args.data)
    samples = [source[i] for i in range(len(source))]
    truth = torch.tensor([s.meta["emoji_index"] for s in samples])
    tok = SeedTokenizer.from_pretrained("tiny").eval()
    decoder = tok.image_decoder()
    pipe = decoder.pipeline
    ids = torch.cat([tok.encode([s.image for s in samples[i:i + 100]], batch_size=50)
                     for i in range(0, len(samples), 100)])
    with torch.inference_mode():
        _, head, _, background = pipe.coarse.float()(tok.decode_embeddings(ids).float(), return_parts=True)
    captions, colours = tok.caption_scores(ids, decoder.prior_captions(1.0), by_column=True)
    weight, temperature = pipe.config.text_prior_weight, pipe.config.text_prior_temperature
    both = head.float().log_softmax(-1) + pipe.text_log_prior(captions, len(ids))  # as the head combines them
    rows = {"decoder's coarse head (logits)": topk(head, truth),
            "tokenizer's caption scores (the text prior alone)": topk(captions, truth),
            f"head + text prior (weight {weight:g}, temperature {temperature:g})": topk(both, truth)}
    if args.train_ids:
        from seedtok.data.ids import load_ids
        from seedtok.data.emoji import pool

        index = {e.name: i for i, e in enumerate(pool())}
        sets = [load_ids(folder) for folder in args.train_ids]
        train_ids = torch.cat([s.ids for s in sets])
        train_y = torch.tensor([m.get("emoji_index", index.get(m.get("emoji"), -1)) for s in sets for m in s.meta])
        if (train_y < 0).any():
            raise SystemExit("identity_probe: --train-ids must hold emoji-world scenes (meta with emoji_index)")
        for positional, name in ((False, "bag of ids"), (True, "(position, id) pairs")):
            scores = linear_probe(train_ids, train_y, ids.cpu(), len(pool()), positional, args.epochs)
            label = f"linear probe on the {name}, {len(train_ids):,} training scenes x {args.epochs} epochs"
            rows[label] = topk(scores, truth)
    # the background: which of the world's named colours (the prior's caption columns) each reader names
    background_truth = torch.tensor([list(PALETTE).index(s.meta["background"]) for s in samples])
    nearest = pipe.background_colour_names()
    joint = background.float().log_softmax(-1) + pipe.background_log_prior(colours, len(ids))
    backgrounds = {"decoder's coarse head (its learned colour's nearest named one)": nearest[background.argmax(1)],
                   "tokenizer's caption scores per colour (the best emoji on each)": colours.argmax(1),
                   f"head + text prior (weight {weight:g}, temperature {temperature:g})": nearest[joint.argmax(1)]}
    backgrounds = {name: 100.0 * (pick == background_truth).float().mean().item()
                   for name, pick in backgrounds.items()}
    width = max(map(len, [*rows, *backgrounds]))
    seconds = time.perf_counter() - t0
    print(f"emoji identity from the tiny ids, {len(samples):,} scenes of {args.data} ({seconds:.0f} s)")
    print(f"{'reader':<{width}}  top-1   top-5")
    for name, (top1, top5) in rows.items():
        print(f"{name:<{width}}  {top1:5.1f}   {top5:5.1f}")
    print(f"{'background colour':<{width}}  top-1")
    for name, accuracy in backgrounds.items():
        print(f"{name:<{width}}  {accuracy:5.1f}")
    report = {"data": args.data, "n": len(samples),
              "readers": {name: {"top1": top1, "top5": top5} for name, (top1, top5) in rows.items()},
              "background_readers": backgrounds}
    if args.json_out:
        from seedtok.fileio import atomic_write_text

        atomic_write_text(args.json_out, json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
