"""Packing char GRUs into one wider GRU: its logits are the members' mean, and it exports."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rnnserve.export import shipped
from rnnserve.export.ensemble import pack_gru_ensemble, pack_runs
from rnnserve.export.model import RecurrentModel, build_model
from rnnserve.export.shipped import Recipe
from rnnserve.export.spec import ModelSpec
from rnnserve.export.tasks import CharTask, TaskOptions
from rnnserve.export.train import TrainConfig
from rnnserve.manifest import load_manifest


def char_gru(hidden: int, embedding: int, seed: int, cell: str = "gru") -> RecurrentModel:
    torch.manual_seed(seed)
    spec = ModelSpec(cell, "tokens", 11, hidden, 1, 11, embedding_dim=embedding)
    model = build_model(spec)
    with torch.no_grad():  # weights large enough to saturate the gates somewhere
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def test_packed_logits_are_the_members_mean_and_the_state_is_theirs_side_by_side() -> None:
    members = [char_gru(5, 3, 0), char_gru(7, 4, 1), char_gru(4, 2, 2)]
    packed = pack_gru_ensemble(members)
    assert (packed.spec.hidden_size, packed.spec.embedding_dim) == (16, 9)
    x = torch.randint(0, 11, (13, 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        state = None
        member_states: list[tuple[torch.Tensor, ...] | None] = [None, None, None]
        for chunk in (x[:6], x[6:]):  # the state carried across chunks, as a server does
            y, state = packed(chunk, state)
            outs = []
            for i, m in enumerate(members):
                out, member_states[i] = m(chunk, member_states[i])
                outs.append(out)
            torch.testing.assert_close(y, torch.stack(outs).mean(0), atol=1e-5, rtol=0)
            side_by_side = torch.cat([s[0] for s in member_states if s is not None], dim=-1)
            torch.testing.assert_close(state[0], side_by_side, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("members", "needle"),
    [
        ([char_gru(4, 2, 0)], "at least 2"),
        ([char_gru(4, 2, 0), char_gru(4, 2, 1, cell="lstm")], "model 1 is a 1-layer lstm"),
    ],
)
def test_what_cannot_be_packed_is_refused(members: list[RecurrentModel], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        pack_gru_ensemble(members)


def test_train_all_trains_the_members_packs_and_exports_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    options = TaskOptions(batch_size=4, bptt=16, embedding_dim=8, corpus_limit=3000)
    config = TrainConfig(task="char", cell="gru", hidden=12, epochs=1, options=options)
    recipe = Recipe("char-pair", config, "two tiny GRUs", also=(replace(config, seed=1),))
    monkeypatch.setattr(shipped, "RECIPES", (recipe,))
    [(_, result, manifest)] = shipped.train_all(
        tmp_path / "runs", tmp_path / "models", curves_dir=tmp_path / "img", log=lambda _: None
    )
    members = shipped.member_folders(tmp_path / "runs" / "char-pair", recipe)
    assert all((m / "best.pt").is_file() for m in members)
    assert manifest.hidden_size == 24 and manifest.cell == "gru"
    assert manifest.parity["max_abs_diff"] <= 1e-5
    again = pack_runs(members, CharTask(options), tmp_path / "again")
    assert (
        load_manifest(tmp_path / "models" / "char-pair" / "1").metrics["val_bpc"]
        == (again["val_bpc"])
    )
    assert result.best_metrics == again and result.spec.hidden_size == 24
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        "char-pair-member-1-loss.png",
        "char-pair-member-2-loss.png",
    ]
