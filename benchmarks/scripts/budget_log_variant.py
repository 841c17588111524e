"""Tried and dropped (issue 27): the activation budget spent greedily on the most log kept
energy per byte of each mode; benchmarks/budget_fidelity.py with that allocation patched in
(results in /tmp/budget_fidelity_log_variant.md)."""
import sys, numpy as np
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from actcomp_edge.core import rank_budget as rb
def allocate_log(spectra, shapes, budget_bytes):
    need = rb.minimum_bytes(shapes)
    if need > budget_bytes: raise ValueError("below")
    ranks = {n: [1]*len(s) for n, s in shapes.items()}
    used = need
    def raises(name):
        shape, k, E = shapes[name], ranks[name], spectra[name]
        out = []
        for n in range(len(shape)):
            e = E[n]; tot = float(e.sum())
            if tot > 0 and k[n] < len(e) and e[k[n]] > 0:
                f0 = float(e[:k[n]].sum())/tot; f1 = f0 + float(e[k[n]])/tot
                cost = rb.tucker_bytes(shape, k[:n]+[k[n]+1]+k[n+1:]) - rb.tucker_bytes(shape, k)
                out.append(((np.log(f1)-np.log(f0))/cost, n, cost))
        return out
    cand = {n: raises(n) for n in shapes}
    while True:
        fit = [(v, name, n, c) for name, o in cand.items() for v, n, c in o if used + c <= budget_bytes]
        if not fit: return {n: tuple(k) for n, k in ranks.items()}, None
        _, name, n, c = max(fit, key=lambda t: t[0]); ranks[name][n] += 1; used += c; cand[name] = raises(name)
rb.allocate = allocate_log
import runpy
sys.argv = ["budget_fidelity.py", "--layers", "4", "--out", "/tmp/budget_fidelity_log_variant"]
runpy.run_path(str(REPO / "benchmarks" / "budget_fidelity.py"), run_name="__main__")
