"""The golden zoo: what the compiler concludes about every test model, recorded once and compared.

For every model of the zoo (tests/architectures.py, the reference ViM / PlainMamba, the official
ViM / PlainMamba code reproduced in tests/official_*.py, mambapy's Vim
and a `register_scan` loop scan) this records, from the public pipeline only:
- the token fact of every node of the captured graph (`node.meta["mambaprune.tokens"]`), layouts
  as a digest of their path;
- what the analysis found: blocks, protected positions, class tokens, valid and refused sites,
  stage ends, the nodes it did not understand;
- for a few settings, the pruned model's report, its outputs and its kept positions on fixed
  images (or the error it raised).

`python tests/golden_zoo.py` rewrites tests/golden/ (facts.json, outputs.safetensors);
tests/test_golden.py compares a fresh run with them. A refactoring of the compiler must leave
both unchanged; a deliberate change of behaviour regenerates them, and the diff of facts.json
is the review of that change.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import architectures as arch  # noqa: E402
from loop_scans import loop_scan, loop_scan_adapter  # noqa: E402
from mamba_ssm_stub import installed as mamba_ssm_installed  # noqa: E402

import mambaprune  # noqa: E402
from mambaprune.models import create_model  # noqa: E402

GOLDEN_DIR = os.path.join(HERE, "golden")
FACTS_FILE = os.path.join(GOLDEN_DIR, "facts.json")
OUTPUTS_FILE = os.path.join(GOLDEN_DIR, "outputs.safetensors")

# (ratio, alignment, metric, fill) per recorded build
SETTINGS = {
    "hold-novelty-0.3": dict(ratio=0.3, alignment="hold", metric="novelty"),
    "none-clip-0.3": dict(ratio=0.3, alignment="none", metric="clip"),
    "decay-l2-0.4": dict(ratio=0.4, alignment="decay", metric="l2"),
    "unsorted-delta-0.2-zeros": dict(ratio=0.2, alignment="none-unsorted", metric="delta", fill="zeros"),
}


# ------------------------------------------------------------------------------------------ models
class LoopMixer(nn.Module):
    """A bidirectional (B, L, D) mixer whose scan is a Python loop (declared with register_scan)."""

    def __init__(self, dim, d_state=4, expand=2, d_conv=4):
        super().__init__()
        inner = expand * dim
        self.d_state, self.dt_rank = d_state, max(1, dim // 8)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner, 1)))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, dim)

    def direction(self, h):
        x, z = self.in_proj(h).chunk(2, dim=-1)
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :h.shape[1]]).transpose(1, 2)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return loop_scan(x, F.softplus(self.dt_proj(dt)), -torch.exp(self.A_log), B, C, self.D) * F.silu(z)

    def forward(self, h):
        return self.out_proj(self.direction(h) + self.direction(h.flip(1)).flip(1))


class LoopVim(nn.Module):
    def __init__(self, dim=16, depth=4, patch=8, img_size=32, num_classes=5):
        super().__init__()
        self.img_size = img_size
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.layers = nn.ModuleList(LoopMixer(dim) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return self.head(x[:, 0])


def mambapy_vim():
    from mambapy.vim import MambaConfig, VMamba

    class MambapyVim(nn.Module):
        def __init__(self, dim=32, depth=4, patch=4, img_size=32):
            super().__init__()
            self.img_size = img_size
            self.patch = nn.Conv2d(3, dim, patch, patch)
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
            self.backbone = VMamba(MambaConfig(d_model=dim, n_layers=depth, d_state=8, use_cuda=False))
            self.head = nn.Linear(dim, 10)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.backbone(x)[:, 0])

    return MambapyVim()


# 8 x 8 tokens, 8 blocks: small enough to be quick, large enough that pruning pays for the conv stem.
PLAINMAMBA_TINY = dict(img_size=32, patch_size=4, depth=8, embed_dim=64, d_state=4, num_classes=10)


def reference(name, **config):
    return lambda: create_model(name, **config)


CASES = {
    **{f"arch/{name}": builder for name, builder in arch.ZOO.items()},
    "ref/vim": reference("vim_t", img_size=32, patch_size=8, depth=6, embed_dim=32, d_state=4, num_classes=10),
    "ref/plainmamba_l1": reference("plainmamba_l1", **PLAINMAMBA_TINY),
    "ref/plainmamba_plain": reference("plainmamba_l1", **PLAINMAMBA_TINY, layers_with_dwconv=()),
    "official/plainmamba": lambda: __import__("official_plainmamba").tiny_classifier(),
    "official/vim": lambda: __import__("official_vim").tiny(),
    "mambapy/vim": mambapy_vim,
    "register_scan/loop_vim": LoopVim,
}


def build_model(case: str) -> nn.Module:
    """The model of `case` (seeded); official/* cases only inside `case_context(case)`."""
    torch.manual_seed(0)
    return CASES[case]().eval()


@contextlib.contextmanager
def case_context(case: str):
    """What a case needs around it: the mamba_ssm stand-in (official/*), its loop scan registered
    (register_scan/*)."""
    with contextlib.ExitStack() as stack:
        if case.startswith("official/"):
            stack.enter_context(mamba_ssm_installed())
        if case.startswith("register_scan/"):
            mambaprune.register_scan(loop_scan, loop_scan_adapter)
            stack.callback(mambaprune.unregister_scan, loop_scan)
        yield


def images_for(model: nn.Module, batch: int = 3) -> torch.Tensor:
    size = getattr(model, "img_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", 32)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------------------- serialise
def digest(layout) -> str:
    return hashlib.sha1(layout.path.tobytes()).hexdigest()[:12]


def describe_fact(fact) -> str:
    """A token fact as one line: its class and fields, layouts as length:digest of their path."""
    if fact is None:
        return "-"
    if isinstance(fact, tuple):
        return "(" + ", ".join(describe_fact(f) for f in fact) + ")"
    fields = []
    for field in ("dim", "hdim", "wdim", "gdim", "height", "width", "padding", "kind", "position", "reason"):
        if hasattr(fact, field):
            fields.append(f"{field}={getattr(fact, field)}")
    if hasattr(fact, "layout"):
        fields.append(f"layout={fact.layout.length}:{digest(fact.layout)}")
    if hasattr(fact, "layouts"):
        fields.append("layouts=" + "/".join(f"{layout.length}:{digest(layout)}" for layout in fact.layouts))
    return f"{type(fact).__name__}(" + ", ".join(fields) + ")"


def describe_analysis(analysis) -> dict:
    names = lambda nodes: [n.name for n in nodes]  # noqa: E731
    return {
        "blocks": [{"index": b.index, "name": b.name, "scans": names(b.scans), "y": b.y.name if b.y else None,
                    "token_length": b.token_length, "container": b.container} for b in analysis.blocks],
        "token_length": analysis.token_length,
        "protected": sorted(analysis.protected),
        "class_tokens": sorted(analysis.class_tokens),
        "barriers": names(analysis.barriers),
        "valid_sites": list(analysis.valid_sites),
        "invalid_sites": {str(k): v for k, v in sorted(analysis.invalid_sites.items())},
        "stage_ends": {str(k): {"downsampling": s.stage_end.downsampling.name, "restore": s.stage_end.restore.name,
                                "chain": names(s.stage_end.chain)}
                       for k, s in sorted(analysis.sites.items()) if s.stage_end is not None},
        "cuts": {str(k): len(s.cut) for k, s in sorted(analysis.sites.items())},
        "not_understood": [[n.name, n.reason] for n in analysis.not_understood],
    }


def describe_graph(gm) -> list:
    """One line per node that carries a token fact or another mambaprune fact."""
    rows = []
    for node in gm.graph.nodes:
        fact = node.meta.get("mambaprune.tokens")
        extra = [f"{key.split('.', 1)[1]}={_plain(value)}" for key, value in sorted(node.meta.items())
                 if key.startswith("mambaprune.") and key not in ("mambaprune.tokens", "mambaprune.flops")]
        if fact is not None or extra:
            rows.append(" ".join([f"{node.name}: {describe_fact(fact)}"] + extra))
    return rows


def _plain(value):
    if hasattr(value, "tolist"):
        return hashlib.sha1(str(value.tolist()).encode()).hexdigest()[:12]
    if hasattr(value, "name") and hasattr(value, "op"):
        return value.name
    return value


# ------------------------------------------------------------------------------------------ record
def prepare(model, x):
    from mambaprune.api import prepare as _prepare
    return _prepare(model, (x[:1],))


def build(prepared, settings: dict):
    from mambaprune.api import build as _build
    from mambaprune.settings import PruneSettings
    return _build(prepared, PruneSettings(**settings))


def record_case(case: str, inspect=None):
    """(facts, tensors) of one case; `inspect(pruned)` is called on every pruned model built."""
    with case_context(case):
        model = build_model(case)
        return _record(case, model, images_for(model), inspect)


def _record(case, model, x, inspect):
    try:
        prepared = prepare(model, x)
    except mambaprune.MambapruneError as err:
        return {"error": f"{type(err).__name__}: {err}"}, {}
    facts = {"graph": describe_graph(prepared.captured.gm), "analysis": describe_analysis(prepared.analysis),
             "flops": sum(prepared.flops.values()), "builds": {}}
    tensors = {}
    for name, settings in SETTINGS.items():
        try:
            pruned = build(prepared, settings)
        except mambaprune.MambapruneError as err:
            facts["builds"][name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        if inspect is not None:
            inspect(pruned)
        with torch.no_grad():
            tensors[f"{case}/{name}/out"] = pruned(x).contiguous()
            for site, positions in pruned.kept_positions(x).items():
                tensors[f"{case}/{name}/kept/{site}"] = positions.contiguous()
        facts["builds"][name] = {"report": str(pruned.report).splitlines(), "pruned_flops": pruned.report.pruned_flops}
    return facts, tensors


def record_all(cases=None):
    facts, tensors = {}, {}
    for case in cases or CASES:
        facts[case], case_tensors = record_case(case)
        tensors.update(case_tensors)
    return facts, tensors


def main() -> None:
    from safetensors.torch import save_file

    facts, tensors = record_all()
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(FACTS_FILE, "w") as f:
        json.dump(facts, f, indent=1, sort_keys=True)
        f.write("\n")
    save_file(tensors, OUTPUTS_FILE)
    print(f"wrote {FACTS_FILE} ({len(facts)} cases) and {OUTPUTS_FILE} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
