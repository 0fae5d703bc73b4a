"""Several trained char GRUs packed into one wider GRU that outputs the mean of their logits.

A GRU's gates act unit by unit, so models side by side are one GRU whose weights are
block-diagonal: the embeddings are concatenated (member ``i`` reads its own slice), every gate's
input and recurrent matrix holds each member's block on the diagonal and zeros elsewhere, and
the head divides each member's head by their number, so the logits are the members' mean
(a product of their distributions, renormalised by the softmax). The packed model is an
ordinary ``nn.GRU`` model: it exports to one ONNX ``GRU`` node like any other, its state is the
members' states one after the other, and the packing is exact up to float rounding
(``tests/unit/test_ensemble.py``).

``pack_runs`` packs the best epochs of finished runs and writes the result as a checkpoint
(``best.pt`` in a folder of its own), so ``shipped.export_run`` exports it like a trained run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from rnnserve.export.checkpoint import load_checkpoint, save_checkpoint
from rnnserve.export.model import RecurrentModel, build_model
from rnnserve.export.runs import BEST
from rnnserve.export.spec import ModelSpec
from rnnserve.export.tasks import CharTask


def pack_gru_ensemble(members: list[RecurrentModel]) -> RecurrentModel:
    """One GRU model whose logits are the mean of ``members``' logits, step for step.

    Every member must be a one-layer ``gru`` token model over the same vocabulary; ValueError
    says which is not.
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 models, got {len(members)}")
    first = members[0].spec
    for i, m in enumerate(members):
        s = m.spec
        if s.cell != "gru" or s.input_kind != "tokens" or s.layers != 1:
            raise ValueError(
                f"model {i} is a {s.layers}-layer {s.cell} {s.input_kind} model; only one-layer "
                "gru token models can be packed"
            )
        if (s.input_size, s.output_size) != (first.input_size, first.output_size):
            raise ValueError(
                f"model {i} reads {s.input_size} tokens and writes {s.output_size}; model 0 "
                f"{first.input_size} and {first.output_size}: pack models of one vocabulary"
            )
    hidden = [m.spec.hidden_size for m in members]
    embed = [m.spec.embedding_dim for m in members]
    spec = ModelSpec(
        cell="gru",
        input_kind="tokens",
        input_size=first.input_size,
        hidden_size=sum(hidden),
        layers=1,
        output_size=first.output_size,
        embedding_dim=sum(embed),
    )
    packed = build_model(spec)
    big_h = spec.hidden_size
    with torch.no_grad():
        target = {k: torch.zeros_like(v) for k, v in packed.state_dict().items()}
        h0, e0 = 0, 0
        for m, h, e in zip(members, hidden, embed, strict=True):
            w = m.state_dict()
            target["embedding.weight"][:, e0 : e0 + e] = w["embedding.weight"]
            for gate in range(3):  # nn.GRU stacks r, z, n
                rows = slice(gate * big_h + h0, gate * big_h + h0 + h)
                mine = slice(gate * h, (gate + 1) * h)
                target["rnn.weight_ih_l0"][rows, e0 : e0 + e] = w["rnn.weight_ih_l0"][mine]
                target["rnn.weight_hh_l0"][rows, h0 : h0 + h] = w["rnn.weight_hh_l0"][mine]
                target["rnn.bias_ih_l0"][rows] = w["rnn.bias_ih_l0"][mine]
                target["rnn.bias_hh_l0"][rows] = w["rnn.bias_hh_l0"][mine]
            target["head.weight"][:, h0 : h0 + h] = w["head.weight"] / len(members)
            target["head.bias"] += w["head.bias"] / len(members)
            h0, e0 = h0 + h, e0 + e
        packed.load_state_dict(target)
    packed.eval()
    return packed


def pack_runs(run_dirs: list[Path], task: CharTask, out_dir: Path) -> dict[str, Any]:
    """Pack the ``best.pt`` of each run in ``run_dirs`` and write ``out_dir/best.pt``.

    The checkpoint holds the packed model, the runs' vocabulary and data set facts, and the
    packed model's own validation metrics on ``task`` (the members' are in ``members``).
    Returns those metrics.
    """
    loaded = [load_checkpoint(Path(d) / BEST) for d in run_dirs]
    vocabularies = {tuple(info["vocabulary"] or ()) for _, info in loaded}
    if len(vocabularies) != 1 or list(vocabularies.pop()) != task.vocabulary:
        raise ValueError("the runs to pack were trained on other texts; pack runs of one corpus")
    packed = pack_gru_ensemble([m for m, _ in loaded])
    metrics = task.evaluate(packed, torch.device("cpu"))
    members = [
        {"run": str(d), "epoch": info["epoch"], "val_bpc": info["metrics"].get("val_bpc", math.nan)}
        for d, (_, info) in zip(run_dirs, loaded, strict=True)
    ]
    save_checkpoint(
        Path(out_dir) / BEST,
        {
            "spec": packed.spec.to_dict(),
            "model": {k: v.detach().cpu() for k, v in packed.state_dict().items()},
            # the epoch of the latest member: what export records as the model's epoch
            "epoch": max(info["epoch"] for _, info in loaded),
            "config": {"ensemble_of": members},
            "vocabulary": task.vocabulary,
            "input_scaling": None,
            "output_scaling": None,
            "dataset": task.facts,
            "metrics": metrics,
            "history": [],
        },
    )
    return metrics
