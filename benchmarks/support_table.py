"""The README's support table for published vision-SSM code outside the four taught families.

Runs the standard checks of tests/official_zoo/checks.py (the same as tests/test_official_zoo.py) on
every family of the zoo (tests/official_zoo: each family's computation reproduced in its authors'
style, tiny sizes, random weights, the mamba_ssm and CUDA-extension stand-ins of the tests) and
writes what was pruned, or the refusal with its reason, as markdown.

Writes benchmarks/results/support_table.md. Run: python benchmarks/support_table.py
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import official_zoo  # noqa: E402
from tests.official_zoo import checks  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "support_table.md"


# what each family's code does that decides the outcome (our reading of their repository)
CODE = {
    "localmamba": "4 searched scan directions per layer (row, column, flips, 2x2 windows by view/permute inside "
                  "autograd Functions), one parameter set each, `mamba_inner_fn_no_out_proj`; 2-D RoPE on hidden "
                  "states and residual; token-mean channel gate; mean pool",
    "videomamba": "ViM-like, class token at the head, bidirectional fork mixer (sum, not halved)",
    "mambar": "registers spread through the tokens by one constant gather; the scan through a vendored "
              "`MambaInnerFnCustom` calling `selective_scan_cuda.fwd` / `causal_conv1d_cuda` directly",
    "mamba_nd": "one direction per layer (flip / column-major alternating by layer); `nn.Unfold` PatchMerging "
                "after block 3 (released: 9)",
    "groupmamba": "4 channel groups, one direction each (autograd cross-scans filling `new_empty` by slice writes); "
                  "`SelectiveScanCore` bound by `functools.partial` at construction, called in a closure; a class "
                  "block on the mean token",
    "simba": "hierarchical, mamba_ssm `Mamba` + PVT2FFN; a class block on the mean token; token-labelling head",
    "efficientvmamba": "atrous scan: 4 interleaved sub-grids by strided slice writes; its own `SelectiveScan` "
                       "autograd Function over `selective_scan_cuda_core.fwd`",
    "medmamba": "channels split: half through VMamba's first SS2D (stack / cat / flip cross-scan, mamba_ssm "
                "`selective_scan_fn`), half through convs; channel shuffle; PatchMerging2D (strided slices)",
    "vssd": "Mamba-2 mixer after a depthwise 2-D conv over the grid; the released configs run its non-causal SSD "
            "(a sum over every token, no scan), `mamba_chunk_scan_combined` is the ablation; x, dt, A, B, C "
            "wrapped in a Tensor subclass (`tTensor`); cpe convs, conv PatchMerging, attention in the last stage",
    "efficientvim": "HSM-SSD, their Mamba-2 (SSD) layer in the hidden-state space: dt, B, C from 1x1 + depthwise "
                    "3x3 convs, a softmax over every token of dt + A, the state a sum over every token, mixed and gated "
                    "in N slots, read out with C (non-causal, no scan); layer-scaled depthwise convs and FFN; the "
                    "logits of every stage's pooled state summed",
    "hf_mamba": "transformers' `MambaMixer.slow_forward` on image patches: the discretisation computed once, the "
                "recurrence a Python loop over the tokens (`ssm_state = discrete_A[:, :, i, :] * ssm_state + "
                "deltaB_u[:, :, i, :]`, a matmul with C as a column), the outputs stacked; no scan function to route",
    "vmunet": "a segmentation U-Net: VMamba's first SS2D (mamba_ssm `selective_scan_fn`) in encoder and decoder "
              "stages, PatchMerging2D down, `PatchExpand2D` up (a linear layer, then einops moves channels into "
              "space), each encoder stage's input added to the decoder as a skip; per-pixel logits at the image's "
              "resolution after a x4 expansion and a 1x1 conv",
}
MESSAGE_CHARS = 420


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def pruned_text(out: checks.Outcome) -> str:
    r = out.report
    sites = ", ".join(f"before block {k} ({r.blocks[k].name}): keep {v}/{r.site_lengths.get(k, r.token_length)}"
                      for k, v in sorted(r.sites.items()))
    return f"at ratio {out.ratio}: {sites}; FLOPs -{r.achieved_ratio:.3f}"


def checks_text(out: checks.Outcome) -> str:
    parts = [f"untouched {'yes' if out.untouched else 'NO'}"]
    if out.ratio0_diff == out.ratio0_diff:
        parts.insert(0, f"ratio 0: max diff {out.ratio0_diff:.1e}")
    if out.report is not None:
        parts += [f"keep-all {out.keep_all_diff:.1e}", f"batch {out.batch_diff:.1e}",
                  f"finite {'yes' if out.finite else 'NO'}", "all green" if checks.green(out) else "NOT green"]
    return ", ".join(parts)


def row(name: str, out: checks.Outcome, module) -> str:
    family = f"{official_zoo.FAMILIES[name]} ({module.PAPER}; `{module.REPO}`)"
    if out.pruned is not None:
        what, why = pruned_text(out), "; ".join(out.report.unprunable_sites.values()) or "-"
    else:
        message = str(out.refusal).split("; and after block")[0]
        message = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + " ..."
        what, why = "nothing", f"{type(out.refusal).__name__}: {message}"
    return (f"| {cell(family)} | {cell(CODE[name])} (`tests/official_zoo/{name}`) | {cell(what)} | {cell(why)} | "
            f"{cell(checks_text(out))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="families to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with official_zoo.installed():
        for name in args.only or official_zoo.FAMILIES:
            module = official_zoo.family(name)
            torch.manual_seed(0)
            model = module.tiny().eval()
            out = checks.run(name, model, model.img_size, ratio=checks.ratio_for(module))
            print(f"{name}: {'pruned' if out.pruned is not None else 'refused'} ({out.seconds:.0f} s)", flush=True)
            rows.append(row(name, out, module))
    pruned = sum("| nothing |" not in r for r in rows)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"`python benchmarks/support_table.py`, {stamp}, {platform.machine()} CPU "
             f"({platform.node() and 'shared 2-core VM'}), torch {torch.__version__}, one thread; random weights, tiny "
             f"configs of the released structures. Pruned with every check green (at ratio {checks.RATIO}, or the "
             f"family's own RATIO where its tiny config cannot reach it): {pruned} of {len(rows)} families.", "",
             "| family (paper; repository) | what its code does (our reproduction) | pruned | refused (why) | "
             "checks |",
             "|---|---|---|---|---|", *rows]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
