"""Every example a user copies runs: the README's commands and Python snippets, and the user
guide's Python snippets, executed as written, in order, in a scratch folder holding `photos/`
(a folder of JPEGs, one sub-folder per class, as the README assumes).

Only the sizes are made tiny, from outside the examples: the presets, the final recipe and the
offline demo datasets' caps are shrunk (``tiny`` below), and `biotune compare` and `biotune train`
get a one-point grid and one seed by default. Of the set-up commands, `pip install` is CI's own
step (`.ci/run`) and the test command is this very suite, so only their `biotune search` runs
here. A new kind of command in a README block fails this test until it is taught to run it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biotune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def _tiny(config):
    """A preset at the smallest size that still runs every stage (evolution, re-ranking, final)."""
    from biotune.training import TrainConfig

    evolution = replace(config.evolution, population_size=3, generations=1, elite=1)
    protocol = replace(
        config.protocol, seeds=(0,), train=replace(config.protocol.train, epochs=1, patience=1)
    )
    final = TrainConfig(epochs=1, patience=1, batch_size=16, eval_batch_size=64)
    return replace(config, evolution=evolution, protocol=protocol, final=final, final_seeds=(0,))


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A scratch folder with photos/, and every size an example does not set made tiny."""
    import biotune.cli.compare
    import biotune.cli.train
    import biotune.presets
    import biotune.runner.workbench
    from biotune.training import TrainConfig

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            pixels[..., 0 if name == "cat" else 2] //= 4  # something to learn
            Image.fromarray(pixels).save(tmp_path / "photos" / name / f"{i}.jpg")
    presets = dict(biotune.presets.PRESETS)
    tiny = {name: (lambda make=make: _tiny(make())) for name, make in presets.items()}
    monkeypatch.setattr(biotune.presets, "PRESETS", tiny)
    final = TrainConfig(epochs=1, patience=1, batch_size=16, eval_batch_size=64)
    monkeypatch.setattr(biotune.presets, "FINAL_TRAINING", final)
    monkeypatch.setattr(biotune.runner.workbench, "DEMO_SIZES", (40, 20, 20))
    monkeypatch.setattr(biotune.cli.compare, "DEFAULT_LR_GRID", (1e-3,))
    monkeypatch.setattr(biotune.cli.compare, "DEFAULT_SEEDS", (0,))
    monkeypatch.setattr(biotune.cli.train, "TRAIN_SEEDS", (0,))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _commands(block: str) -> list[list[str]]:
    """Each command of a shell block as argv, `a && b` as two commands, comments dropped."""
    commands: list[list[str]] = [[]]
    for line in block.splitlines():
        for token in shlex.split(line, comments=True):
            if token == "&&":
                commands.append([])
            else:
                commands[-1].append(token)
        commands.append([])
    return [c for c in commands if c]


def test_the_readme_commands_run(scratch, capsys):
    ran = []
    for block in _blocks(ROOT / "README.md", "bash"):
        for argv in _commands(block):
            if argv[:2] == ["pip", "install"] or "pytest" in argv:
                continue  # CI's install step, and this test suite itself
            assert argv[0] == "biotune", f"the README runs {argv}: teach this test to run it"
            assert main(argv[1:]) == 0, argv
            ran.append(argv[1])
            if ran == ["search"]:  # the quickstart: its summary has the README's lines
                out = capsys.readouterr().out
                sample = _blocks(ROOT / "README.md", "text")[0]
                for line in sample.splitlines():
                    start = re.match(r"\D*", line).group(0)
                    assert any(o.startswith(start) for o in out.splitlines()), (start, out)
    assert {"search", "predict", "report", "train", "blocks", "compare"} <= set(ran)
    assert (scratch / "runs" / "photos" / "model.safetensors").exists()
    assert (scratch / "my-model" / "finetuned.json").exists()


@pytest.mark.parametrize("page", ["README.md", "docs/user-guide.md"])
def test_the_python_examples_run(scratch, page):
    blocks = _blocks(ROOT / page, "python")
    assert blocks
    namespace: dict = {}
    for code in blocks:  # one session: a later snippet may use an earlier one's names
        exec(compile(code, page, "exec"), namespace)
