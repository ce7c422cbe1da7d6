#!/usr/bin/env python3
"""Writes tests/fixtures/pref/reference.json: preference losses and their gradients with respect
to the per-sequence log-probabilities, computed by PyTorch's autograd in float64.

ORPO and SimPO call TRL's own loss functions (ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss)
on a stand-in `self` carrying the hyperparameters; the DPO family (sigmoid, cDPO label
smoothing, hinge, IPO) transcribes TRL's DPOTrainer._compute_loss lines (TRL 1.16; they sit in
the middle of a method that needs a model), and so does KTO's loss (KTOTrainer._compute_loss).
kiln's tests (src/train/pref.rs) compare with it.

Run once with torch and trl installed:  python3 scripts/pref-reference.py
"""
import json
import os
import types

import torch
import torch.nn.functional as F
import trl
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer

torch.manual_seed(1234)
P = 6
# Summed log-probabilities of realistic size (−5 … −80 over 4 … 40 tokens), a wide margin
# both ways, and one near-tie.
n_c = torch.randint(4, 40, (P,))
n_r = torch.randint(4, 40, (P,))
chosen = -(torch.rand(P, dtype=torch.float64) * 1.8 + 0.2) * n_c
rejected = -(torch.rand(P, dtype=torch.float64) * 1.8 + 0.2) * n_r
ref_chosen = chosen + torch.randn(P, dtype=torch.float64) * 3.0
ref_rejected = rejected + torch.randn(P, dtype=torch.float64) * 3.0
rejected[5] = chosen[5] - ref_chosen[5] + ref_rejected[5] + 1e-3

dev = types.SimpleNamespace(device="cpu")


def dpo_family(kind, beta, ls, c, r):
    nc, nr = n_c.double(), n_r.double()
    chosen_scores = c - ref_chosen
    rejected_scores = r - ref_rejected
    delta = chosen_scores - rejected_scores
    if kind == "sigmoid":
        # TRL 1.16 "sigmoid" (ls = 0) and its earlier cDPO form / "robust"'s clean term.
        per = -(1 - ls) * F.logsigmoid(beta * delta) - ls * F.logsigmoid(-beta * delta)
    elif kind == "hinge":
        per = torch.relu(1 - beta * delta)
    elif kind == "ipo":
        ipo_delta = chosen_scores / nc.clamp(min=1.0) - rejected_scores / nr.clamp(min=1.0)
        per = (ipo_delta - 1 / (2 * beta)) ** 2
    return per, beta * chosen_scores, beta * rejected_scores


def orpo(beta, c, r):
    self = types.SimpleNamespace(beta=beta, accelerator=dev)
    pc, pr = c / n_c.double(), r / n_r.double()
    losses, cr, rr, _, _ = ORPOTrainer.odds_ratio_loss(self, pc, pr)
    # ORPOTrainer: loss = nll − losses.mean()
    return -losses, cr, rr


def simpo(beta, gamma, ls, c, r):
    self = types.SimpleNamespace(
        beta=beta, simpo_gamma=gamma, label_smoothing=ls, loss_type="simpo", alpha=0.0, accelerator=dev
    )
    pc, pr = c / n_c.double(), r / n_r.double()
    return CPOTrainer.cpo_loss(self, pc, pr)


cases = [
    ("sigmoid", {"beta": 0.1, "label_smoothing": 0.0}, lambda c, r: dpo_family("sigmoid", 0.1, 0.0, c, r)),
    ("sigmoid", {"beta": 0.5, "label_smoothing": 0.2}, lambda c, r: dpo_family("sigmoid", 0.5, 0.2, c, r)),
    ("hinge", {"beta": 0.1}, lambda c, r: dpo_family("hinge", 0.1, 0.0, c, r)),
    ("ipo", {"beta": 0.1}, lambda c, r: dpo_family("ipo", 0.1, 0.0, c, r)),
    ("orpo", {"beta": 0.1}, lambda c, r: orpo(0.1, c, r)),
    ("simpo", {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0}, lambda c, r: simpo(2.0, 0.5, 0.0, c, r)),
    ("simpo", {"beta": 2.5, "gamma": 1.4, "label_smoothing": 0.1}, lambda c, r: simpo(2.5, 1.4, 0.1, c, r)),
]

out = {
    "generator": f"scripts/pref-reference.py (torch {torch.__version__}, trl {trl.__version__})",
    "pairs": [
        {
            "chosen": chosen[i].item(),
            "rejected": rejected[i].item(),
            "ref_chosen": ref_chosen[i].item(),
            "ref_rejected": ref_rejected[i].item(),
            "chosen_tokens": int(n_c[i]),
            "rejected_tokens": int(n_r[i]),
        }
        for i in range(P)
    ],
    "cases": [],
}
for loss, params, fn in cases:
    c = chosen.clone().requires_grad_(True)
    r = rejected.clone().requires_grad_(True)
    per, rc, rr = fn(c, r)
    mean = per.mean()
    mean.backward()
    out["cases"].append(
        {
            "loss": loss,
            "params": params,
            "per_pair": per.detach().tolist(),
            "mean": mean.item(),
            "d_chosen": c.grad.tolist(),
            "d_rejected": r.grad.tolist(),
            "reward_chosen": rc.detach().tolist(),
            "reward_rejected": rr.detach().tolist(),
        }
    )

# KTO (TRL 1.16 KTOTrainer._compute_loss, transcribed: it sits in a method that needs a model).
# One batch of labelled completions with their mismatched KL sequences: kl = mean(KL_logps −
# ref_KL_logps), detached, clamped at 0; desirable 1 − σ(β(r − kl)), undesirable
# 1 − σ(β(kl − r)), weighted; the loss is the mean over the batch. Two batches: one whose KL
# estimate is positive, one where it is clamped.
U = 7
labels = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
k_main = -(torch.rand(U, dtype=torch.float64) * 1.5 + 0.3) * torch.randint(4, 40, (U,)).double()
k_ref = k_main + torch.randn(U, dtype=torch.float64) * 2.0
k_ref_kl = -(torch.rand(U, dtype=torch.float64) * 1.5 + 0.3) * torch.randint(4, 40, (U,)).double()
out["kto"] = []
for beta, wd, wu, shift in [(0.1, 1.0, 1.0, 1.5), (0.5, 1.33, 0.75, -2.0)]:
    kl_lp = (k_ref_kl + shift + torch.randn(U, dtype=torch.float64) * 0.5).requires_grad_(True)
    m = k_main.clone().requires_grad_(True)
    kl = (kl_lp - k_ref_kl).mean().detach().clamp(min=0)
    r = m - k_ref
    per = torch.where(labels, wd * (1 - torch.sigmoid(beta * (r - kl))), wu * (1 - torch.sigmoid(beta * (kl - r))))
    loss = per.mean()
    loss.backward()
    out["kto"].append(
        {
            "params": {"beta": beta, "desirable_weight": wd, "undesirable_weight": wu},
            "labels": labels.tolist(),
            "logps": m.detach().tolist(),
            "ref_logps": k_ref.tolist(),
            "kl_logps": kl_lp.detach().tolist(),
            "ref_kl_logps": k_ref_kl.tolist(),
            "kl": kl.item(),
            "per_unit": per.detach().tolist(),
            "mean": loss.item(),
            "d_logps": m.grad.tolist(),
            "d_kl_logps": [0.0 if g is None else g for g in (kl_lp.grad.tolist() if kl_lp.grad is not None else [0.0] * U)],
        }
    )

path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "pref", "reference.json")
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path, "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
print("wrote", os.path.normpath(path))
