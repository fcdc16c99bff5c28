"""Is token selection what costs the ViM its accuracy under pruning? Scores that know the answer, compared.

    python benchmarks/selection_oracle.py                  # vim_digits, 500 test images, -30% and -50% FLOPs

The shipped ``vim_digits`` is pruned at ToP's sites with compile_pruned's keep counts and
alignment "none" (the alignment "auto" picks for it), eagerly, block by block: at each site the
kept tokens are gathered (the sequence is compacted) and the class token is always kept. Only the
score that ranks the tokens changes:

- ``novelty``: the library's default metric (its predictions are checked to equal compile_pruned's);
- ``random``: a floor;
- ``saliency`` (oracle): |gradient x input| of the dense model's predicted logit at each patch token;
- ``digit box`` (oracle): the fraction of each patch covered by the pasted digit's box (from the data
  generator), ties broken by novelty: every token that shows the digit is kept first.

If the oracles, which know where the answer lies, lose as much as novelty, the loss comes from
removing the context tokens and shortening the sequence, not from choosing the wrong tokens.
Writes benchmarks/results/selection_oracle.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from fidelity import compare, logits_of  # noqa: E402

from mambaprune import compile_pruned  # noqa: E402
from mambaprune.data import make_cluttered_digits  # noqa: E402
from mambaprune.models.pretrained import checkpoint_info, load_pretrained  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCORES = ("novelty", "random", "saliency", "digit box")


def saliency(model, images: torch.Tensor) -> torch.Tensor:
    """|gradient x input| of the predicted logit at every token (0 for the class token), (B, L)."""
    patches = {}

    def keep_gradient(module, inputs, output):
        output.retain_grad()
        patches["tokens"] = output

    hook = model.patch_embed.register_forward_hook(keep_gradient)
    try:
        logits = model(images)
    finally:
        hook.remove()
    logits.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()
    tokens = patches["tokens"]
    return _insert_class_slot(model, (tokens.grad * tokens).sum(-1).abs().detach())


def digit_cover(model, boxes: torch.Tensor, img_size: int) -> torch.Tensor:
    """The fraction of each patch covered by any digit box (top, left, height, width), (B, L)."""
    patch = img_size // model.patch_embed.grid_size[0]
    grid = model.patch_embed.grid_size[0]
    starts = torch.arange(grid) * patch
    cover = torch.zeros(boxes.shape[0], grid, grid)
    for box in boxes.unbind(1):
        top, left, height, width = box.unbind(-1)
        rows = (torch.minimum(starts[None] + patch, (top + height)[:, None]) - torch.maximum(starts[None], top[:, None])).clamp_min(0)
        cols = (torch.minimum(starts[None] + patch, (left + width)[:, None]) - torch.maximum(starts[None], left[:, None])).clamp_min(0)
        cover = torch.maximum(cover, rows[:, :, None] * cols[:, None, :] / patch ** 2)
    return _insert_class_slot(model, cover.flatten(1))


def _insert_class_slot(model, per_patch: torch.Tensor) -> torch.Tensor:
    middle = model.token_position
    return torch.cat((per_patch[:, :middle], per_patch.new_zeros(per_patch.shape[0], 1), per_patch[:, middle:]), dim=1)


@torch.no_grad()
def pruned_forward(model, images: torch.Tensor, sites: dict, score: str, oracle: torch.Tensor | None) -> torch.Tensor:
    """The model with the kept tokens gathered after each site (alignment "none"), ranked by ``score``."""
    hidden, residual = model.embed_tokens(images), None
    cls_slot = torch.full((images.shape[0],), model.token_position)
    positions = torch.arange(hidden.shape[1]).expand(images.shape[0], -1)
    for done, layer in enumerate(model.layers, start=1):
        hidden, residual = layer(hidden, residual)
        if done not in sites:
            continue
        stream = residual + hidden
        novelty = (stream - stream.mean(1, keepdim=True)).norm(dim=-1)
        if score == "novelty":
            ranking = novelty
        elif score == "random":
            ranking = torch.rand(novelty.shape, generator=torch.Generator().manual_seed(done))
        else:
            # oracle first, novelty only orders tokens the oracle cannot tell apart
            ranking = oracle.gather(1, positions) * 1e6 + novelty / novelty.amax(1, keepdim=True)
        ranking = ranking.scatter(1, cls_slot[:, None], float("inf"))
        keep = ranking.argsort(dim=1, descending=True, stable=True)[:, :sites[done]].sort(dim=1).values
        hidden, residual = (t.gather(1, keep[..., None].expand(-1, -1, t.shape[-1])) for t in (hidden, residual))
        cls_slot = (keep == cls_slot[:, None]).int().argmax(1)
        positions = positions.gather(1, keep)
    out = model.norm_f(residual + hidden)
    return model.head(out[torch.arange(out.shape[0]), cls_slot])


def evaluate(model, test, img_size: int, ratios, batch_size: int = 100) -> list:
    dense = logits_of(model, test, batch_size)
    oracles = {"saliency": torch.cat([saliency(model, x) for x, _ in test.batches(batch_size)]),
               "digit box": digit_cover(model, test.boxes, img_size)}
    rows = [{"ratio": 0.0, "score": "dense", **compare(dense, dense, test.labels)}]
    for ratio in ratios:
        compiled = compile_pruned(model, ratio, (test.inputs[:2],), alignment="none")
        sites = dict(compiled.report.sites)
        for score in SCORES:
            oracle = oracles.get(score)
            logits = torch.cat([pruned_forward(model, test.inputs[i:i + batch_size], sites, score,
                                               None if oracle is None else oracle[i:i + batch_size])
                                for i in range(0, len(test), batch_size)])
            if score == "novelty":
                reference = logits_of(compiled, test, batch_size)
                assert torch.equal(reference.argmax(-1), logits.argmax(-1)), "eager pruning differs from compile_pruned"
            rows.append({"ratio": ratio, "score": score, "sites": sites, **compare(dense, logits, test.labels)})
    return rows


def markdown(name: str, rows: list) -> str:
    ratios = sorted({r["ratio"] for r in rows if r["score"] != "dense"})
    lines = [f"{name}, dense accuracy {rows[0]['accuracy']:.3f}, alignment none, ToP's sites; "
             "top-1 accuracy / agreement with dense / KL:\n",
             "| score | " + " | ".join(f"-{r:.0%} FLOPs" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for score in SCORES:
        cells = [next(f"{r['accuracy']:.3f} / {r['agreement']:.3f} / {r['kl']:.3f}" for r in rows
                      if r["score"] == score and r["ratio"] == ratio) for ratio in ratios]
        lines.append(f"| {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--out", default=str(RESULTS / "selection_oracle"), help="output prefix (.json, .md)")
    args = parser.parse_args()
    name = "vim_digits"
    info = checkpoint_info(name)
    img_size = info.overrides["img_size"]
    model = load_pretrained(name).eval()
    test = make_cluttered_digits("test", args.test_size, info.variant, img_size, seed=0)
    rows = evaluate(model, test, img_size, args.ratios)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"model": name, "test_size": args.test_size, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(name, rows))
    print(markdown(name, rows))


if __name__ == "__main__":
    main()
