"""`mambaprune recover`: prune, distil on a folder of images, write the file; one-line errors (exit 2)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mambaprune.__main__ import main

sys.path.insert(0, str(Path(__file__).parent))  # cli_factories is importable as a module
TINY = "cli_factories:tiny_vim"
NORMALISE = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    return tmp_path


def test_recover_writes_the_trained_model_and_says_what_it_did(folder, capsys):
    target = folder / "out" / "recovered.pt2"
    target.parent.mkdir()
    argv = ["recover", TINY, "--ratio", "0.3", "--images", str(folder), "--steps", "2", "--batch-size", "4", "--augment", "mixup+shift",
            "-o", str(target)]
    assert main(argv + NORMALISE) == 0
    out = capsys.readouterr()
    assert "recovered 2 steps in" in out.out and f"wrote {target}" in out.out
    assert "recover: 100%" in out.err    # the progress bar
    loaded = torch.export.load(str(target)).module()
    assert loaded(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("extra, message", [
    (NORMALISE + ["--images", "/nowhere/at/all"], "image folder '/nowhere/at/all' does not exist"),
    (["--images", "FOLDER"], "has no pretrained_cfg / default_cfg with 'mean' and 'std'"),
])
def test_errors_are_one_line_and_exit_2(folder, extra, message, capsys):
    extra = [str(folder) if e == "FOLDER" else e for e in extra]
    assert main(["recover", TINY, "-o", str(folder / "x.pt2"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mambaprune: error: ") and message in err and "\n" not in err


def test_the_shipped_checkpoints_say_how_their_inputs_are_normalised():
    from mambaprune.data.image_folder import model_config
    from mambaprune.models.pretrained import load_pretrained

    cfg = model_config(load_pretrained("vim_digits"))
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.25, 0.25, 0.25) and cfg["input_size"] == (3, 64, 64)


def test_recover_has_help_naming_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["recover", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: mambaprune recover" in out
    assert all(option in out for option in ("--images", "--steps", "--lr", "--batch-size", "--temperature", "--seed",
                                            "--schedule", "--alignment", "--mean", "--std", "-o"))
