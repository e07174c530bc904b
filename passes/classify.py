"""classify: name each state's transition class and record why a program can or cannot be chunked.

identity (a = 1), constant (a has no scan dim, e.g. RetNet), scalar (a varies along time and independent dims
only, e.g. Mamba2), key-wise / value-wise (a varies along the dims the readout contracts / keeps, e.g. GLA),
elementwise (both, e.g. Mamba1), non-diagonal (the update is not a ⊙ S + u with state-free a, u, e.g. DeltaNet).
"""
from __future__ import annotations

from dataclasses import dataclass

from ssmc.ir import Program

from .plan import make_plan


@dataclass(frozen=True)
class Classify:
    name = "classify"

    def run(self, p: Program) -> Program:
        plan = make_plan(p)
        notes = []
        for sp in plan.states.values():
            extra = f" (decay dims [{','.join(sp.decay_dims)}], contracted [{','.join(sp.K)}], " \
                    f"kept [{','.join(sp.V)}])" if sp.klass != "non-diagonal" else f": {sp.reason}"
            notes.append(f"classify: state {sp.name} is {sp.klass}{extra}")
        for i in p.instrs:  # conv windows: inputs shifted along time, no recurrence to classify
            if i.op == "window":
                notes.append(f"classify: state {i.attr('state')} is conv-window (the last {i.attr('k')}-1 inputs "
                             f"of a causal conv; state-free for chunking)")
        instrs = [i.with_attrs(klass=plan.states[i.attr("state")].klass) if i.op == "update" else i
                  for i in p.instrs]
        if not plan.chunkable:
            notes.append(f"classify: not chunkable: {plan.reason}")
        out = p.with_instrs(instrs)
        return out.with_instrs(out.instrs, note="\n  # ".join(notes) if notes else None)
