"""The inspector (``python -m pipeline.inspect``) shows one formatted example with its loss mask."""

from __future__ import annotations

from pipeline.data import main as data_main
from pipeline.inspect import main as inspect_main
from tests.helpers import REPO


def test_inspect_shows_the_loss_mask(tmp_path, capsys):
    recipe = str(REPO / "recipes" / "tiny_ko.yaml")
    assert data_main(["--recipe", recipe, f"run.output_dir={tmp_path}"]) == 0
    capsys.readouterr()
    assert inspect_main(["--recipe", recipe, f"run.output_dir={tmp_path}", "--index", "0", "--tokens"]) == 0
    out = capsys.readouterr().out
    assert "<bos><start_of_turn>user\n" in out and "«" in out and out.count("<bos>") == 2  # text + token table
    assert "<end_of_turn>»" in out  # the model turn's <end_of_turn> is inside the trained span
    assert inspect_main(["--recipe", recipe, f"run.output_dir={tmp_path}", "--stage", "preference"]) == 0
    assert inspect_main(["--recipe", recipe, f"run.output_dir={tmp_path / 'none'}"]) == 2
