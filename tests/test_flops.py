import torch

from mambaprune.api.flops import count_flops, find_ssm_blocks, flops_under_schedule
from mambaprune.models import create_model

# Published dense FLOPs (as "FLOPs" = MACs) and ToP's pruned ViM-S number (ToP, NeurIPS 2024).
VIM_S_DENSE_PUBLISHED = 5.08e9
VIM_S_TOP_PUBLISHED = 3.60e9


def test_vim_tiny_per_layer_flops_exact():
    Bsz, img, p, D, depth, N, classes = 2, 32, 8, 32, 2, 8, 10
    model = create_model("vim_t", img_size=img, patch_size=p, depth=depth, embed_dim=D, d_state=N, num_classes=classes)
    rep = count_flops(model, torch.randn(Bsz, 3, img, img))
    P = (img // p) ** 2
    L, E, R, K = P + 1, 2 * D, 2, 4  # tokens (+ middle cls), d_inner, dt_rank = ceil(32/16), d_conv
    in_proj = L * D * 2 * E
    conv1d = E * (L + K - 1) * K  # padded by K-1 on both sides, sliced to L after
    x_proj = L * E * (R + 2 * N)
    dt_proj = L * R * E
    scan = 9 * L * E * N + E * L + E * L  # + D skip + z gate
    out_proj = L * E * D
    block = Bsz * (in_proj + 2 * (conv1d + x_proj + dt_proj + scan) + out_proj)
    patch_embed = Bsz * P * D * 3 * p * p
    head = Bsz * D * classes
    assert rep.blocks_path == "layers" and rep.block_tokens == [L] * depth
    assert rep.per_block == [block] * depth
    assert rep.per_module["layers.0.mixer.in_proj"] == Bsz * in_proj
    assert rep.per_module["layers.0.mixer.conv1d_b"] == Bsz * conv1d
    assert rep.per_module["patch_embed"] == patch_embed
    assert rep.per_module["head"] == head
    assert rep.total == depth * block + patch_embed + head
    assert rep.scan == Bsz * depth * 2 * scan
    assert rep.per_block_scan == [Bsz * 2 * scan] * depth
    assert "selective_scan" in str(rep)


def test_plainmamba_tiny_per_layer_flops_exact():
    Bsz, img, p, D, depth, N = 1, 32, 8, 32, 2, 8
    model = create_model("plainmamba_l2", img_size=img, patch_size=p, depth=depth, embed_dim=D, d_state=N, num_classes=10)
    rep = count_flops(model, torch.randn(Bsz, 3, img, img))
    L, E, R = (img // p) ** 2, 2 * D, 2
    block = (L * D * 2 * E + E * L * 49 + L * E * (R + 2 * N) + L * R * E
             + 4 * (9 * L * E * N + E * L) + L * E * D)
    assert rep.per_block == [block] * depth
    stem = (img // 2) ** 2 * 64 * 3 * 49 + 2 * (img // 2) ** 2 * 64 * 64 * 9 + L * D * 64 * (p // 2) ** 2
    assert rep.per_module["patch_embed"] == stem
    assert rep.total == depth * block + stem + D * 10


def test_vim_s_top_schedule_ratio():
    with torch.device("meta"):
        model = create_model("vim_s")
    name, blocks = find_ssm_blocks(model)
    assert name == "layers" and len(blocks) == 24
    rep = count_flops(model)  # batch 1 at 224 on the meta device
    pruned = flops_under_schedule(model, {5: 0.8, 10: 0.8, 15: 0.8})
    ratio = pruned / rep.total
    print(f"ViM-S dense {rep.total / 1e9:.3f}G pruned {pruned / 1e9:.3f}G ratio {ratio:.4f}")
    assert abs(ratio - VIM_S_TOP_PUBLISHED / VIM_S_DENSE_PUBLISHED) <= 0.01


def test_schedule_flops_scale_every_block_after_a_site_by_its_tokens():
    """A site after block 1 of 3 keeping 9 of 17 tokens (1 protected + 8 of 16): blocks 1 and 2
    cost 9/17 of their dense FLOPs, block 0 and the stem / head are unchanged."""
    model = create_model("vim_t", img_size=32, patch_size=8, depth=3, embed_dim=32, d_state=8, num_classes=10)
    rep = count_flops(model, torch.randn(1, 3, 32, 32))
    pruned = flops_under_schedule(model, {1: 0.5}, torch.randn(1, 3, 32, 32))
    expected = rep.total - 2 * rep.per_block[1] * (1 - 9 / 17)   # the head reads the class token: unchanged
    assert abs(pruned - expected) <= 1e-6 * expected
