#!/usr/bin/env python3
"""What TIES and KnOTS-TIES keep of each adapter in a merge (numpy only).

Reads PEFT adapters (adapter_config.json + adapter_model.safetensors), forms each update
tau_i = (lora_alpha / r) * B_i @ A_i per module, and reports, per adapter:

  - its share of the set's update energy (sum over modules of ||tau_i||_F^2);
  - dense TIES (trim per adapter over all modules, elect signs, disjoint mean): the fraction of
    its entries kept by the trim, the fraction of its trimmed energy that survives the sign
    election, the cosine between the merged update and tau_i, and the gain
    <merged, tau_i> / ||tau_i||^2 (at λ = 1: how much of tau_i's own direction is left);
  - KnOTS-TIES (per module SVD of [tau_1 | ... | tau_n], TIES on rep_i = diag(s) V_i^T): the same
    three numbers in the aligned coordinates, and how much of tau_i's energy lies in the
    components that hold the top half of the set's energy.

Usage: scripts/knots_trim_report.py [--density 0.4] ADAPTER_DIR...
It mirrors the README's definitions of `ties` and `knots-ties`; it is an analysis aid, not the
implementation (that is src/merge).
"""

import argparse
import json
import pathlib

import numpy as np
from safetensors.numpy import load_file


def load(directory):
    directory = pathlib.Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    updates = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b = tensors[module + ".lora_B.weight"]
        updates[module] = scale * b.astype(np.float64) @ a.astype(np.float64)
    return directory.name, updates


def threshold(values, density):
    """The trim threshold over one adapter's whole flattened representation."""
    magnitudes = np.abs(np.concatenate([v.ravel() for v in values]))
    keep = int(np.floor(magnitudes.size * density))
    if keep >= magnitudes.size:
        return 0.0
    return np.partition(magnitudes, magnitudes.size - keep - 1)[magnitudes.size - keep - 1]


def ties(reps, density):
    """reps[i][m]: adapter i's representation of module m. Returns per-adapter stats and merged."""
    n = len(reps)
    thresholds = [threshold(r, density) for r in reps]
    merged, kept_frac, survive = [], np.zeros(n), np.zeros(n)
    kept_energy, total_entries = np.zeros(n), np.zeros(n)
    surviving_energy = np.zeros(n)
    for m in range(len(reps[0])):
        trimmed = [np.where(np.abs(r[m]) >= t, r[m], 0.0) for r, t in zip(reps, thresholds)]
        total = sum(trimmed)
        sign = np.sign(total)
        agree = [(np.sign(x) == sign) & (x != 0) for x in trimmed]
        count = sum(a.astype(int) for a in agree)
        merged.append(sum(np.where(a, x, 0.0) for a, x in zip(agree, trimmed)) / np.maximum(count, 1))
        for i in range(n):
            kept_frac[i] += np.count_nonzero(trimmed[i])
            total_entries[i] += trimmed[i].size
            kept_energy[i] += np.sum(trimmed[i] ** 2)
            surviving_energy[i] += np.sum(np.where(agree[i], trimmed[i], 0.0) ** 2)
    for i in range(n):
        survive[i] = surviving_energy[i] / max(kept_energy[i], 1e-300)
    return kept_frac / total_entries, survive, merged


def cosine(a, b):
    a = np.concatenate([x.ravel() for x in a])
    b = np.concatenate([x.ravel() for x in b])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def gain(merged, tau):
    """<merged, tau> / ||tau||^2: how much of tau's own direction the merge (λ = 1) carries."""
    a = np.concatenate([x.ravel() for x in merged])
    b = np.concatenate([x.ravel() for x in tau])
    return float(a @ b / (b @ b + 1e-300))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.4)
    parser.add_argument("adapters", nargs="+")
    args = parser.parse_args()
    loaded = [load(d) for d in args.adapters]
    names = [n for n, _ in loaded]
    modules = sorted(set.intersection(*(set(u) for _, u in loaded)))
    taus = [[u[m] for m in modules] for _, u in loaded]
    energy = np.array([sum(np.sum(t ** 2) for t in ts) for ts in taus])

    dense_kept, dense_survive, dense_merged = ties(taus, args.density)

    aligned, top_share = [[] for _ in names], np.zeros(len(names))
    bases = []
    for m in range(len(modules)):
        stacked = np.concatenate([ts[m] for ts in taus], axis=1)
        u, s, vt = np.linalg.svd(stacked, full_matrices=False)
        keep = s > 1e-5
        u, s, vt = u[:, keep], s[keep], vt[keep]
        bases.append(u)
        cols = taus[0][m].shape[1]
        cumulative = np.cumsum(s ** 2) / np.sum(s ** 2)
        top = np.searchsorted(cumulative, 0.5) + 1
        for i in range(len(names)):
            rep = s[:, None] * vt[:, i * cols:(i + 1) * cols]
            aligned[i].append(rep)
            top_share[i] += np.sum(rep[:top] ** 2)
    knots_kept, knots_survive, knots_merged = ties(aligned, args.density)
    knots_updates = [u @ r for u, r in zip(bases, knots_merged)]

    print(f"density {args.density}, {len(modules)} modules")
    print("| adapter | energy share | TIES: kept / sign-election survival / cos(merged, τ) / gain | "
          "KnOTS-TIES: kept / survival / cos / gain | energy in top-half components |")
    print("|---|---|---|---|---|")
    for i, name in enumerate(names):
        dense = (dense_kept[i], dense_survive[i], cosine(dense_merged, taus[i]),
                 gain(dense_merged, taus[i]))
        knots = (knots_kept[i], knots_survive[i], cosine(knots_updates, taus[i]),
                 gain(knots_updates, taus[i]))
        print(
            f"| {name} | {energy[i] / energy.sum():.3f} | "
            + " / ".join(f"{x:.3f}" for x in dense) + " | "
            + " / ".join(f"{x:.3f}" for x in knots) + " | "
            + f"{top_share[i] / energy[i]:.3f} |"
        )


if __name__ == "__main__":
    main()
