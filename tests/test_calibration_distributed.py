"""The calibration of schedule="auto" and alignment="auto" under torch.distributed: 2 gloo processes,
each evaluating its share of the batches, choose what one process chooses, with the same scores."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mambaprune
from mambaprune.capture import flat_inputs
from mambaprune.models import create_model
from mambaprune.search.calibration import Calibration

SHARED = {}   # what the forked ranks read: the model, the calibration batches, an input


def compile_as_rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = searched()
        prepared = mambaprune.api.prepare(SHARED["model"], (SHARED["x"][:1],))
        share = Calibration.of(prepared.captured.gm, [flat_inputs((b,)) for b in SHARED["batches"]])
        result["share"] = (len(share.batches), share.total)
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def searched() -> dict:
    pruned = mambaprune.compile_pruned(SHARED["model"], ratio=0.4, schedule="auto", alignment="auto",
                                       calibration=SHARED["batches"])
    with torch.no_grad():
        kept = {k: v.tolist() for k, v in pruned.kept_positions(SHARED["x"]).items()}
    return {"schedule": pruned.report.schedule_search, "alignment": pruned.report.alignment_search, "kept": kept}


def test_two_gloo_processes_choose_what_one_process_chooses(tmp_path):
    torch.manual_seed(0)
    model = create_model("vim_t", img_size=32, patch_size=8, depth=4, embed_dim=32, d_state=4, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    SHARED.update(model=model, batches=list(torch.randn(12, 3, 32, 32, generator=g).split(4)),  # 3 batches: 2 + 1
                  x=torch.randn(2, 3, 32, 32, generator=g))
    alone = searched()
    mp.start_processes(compile_as_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)   # our own file: enums in the report
        for search in ("schedule", "alignment"):
            (chosen, scores), (chosen_alone, scores_alone) = got[search], alone[search]
            assert chosen == chosen_alone and scores.keys() == scores_alone.keys()
            for key, score in scores.items():
                assert abs(score - scores_alone[key]) <= 1e-9 * max(1.0, abs(score)), (search, key)
        assert got["kept"] == alone["kept"]
        assert got["share"] == ((2, 3) if rank == 0 else (1, 3))   # each rank ran its own batches only
