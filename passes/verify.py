"""Pass `verify`: check the per-rank graph against what its placements imply, and record
the collective schedule.

Checks (each failure is a compiler bug, reported with the node):
* every tensor edge carries the placement its consumer wants (nothing was left to chance);
* no collective sits inside an annotated module (local SPMD held);
* no boundary marker is left;
* the collectives are exactly the redistributions propagation asked for (one per distinct
  (value, wanted placement) pair, stage.facts['redistributions']), fused forms counted as
  their all-reduce.
Result: stage.facts['schedule'], one entry per collective in program order with its layer.
"""
from __future__ import annotations

import re
from collections import Counter

from tscompile.passes.ir import Stage, fmt_val, tensor_args

# A layer is the first numeric component of a module path: layers.3, gpt_neox.layers.3,
# transformer.h.3 (an author's container names are their own).
_LAYER = re.compile(r"^(?:[^.]+\.)*?(\d+)(\.|$)")


class VerifyError(AssertionError):
    pass


def verify(stage: Stage) -> Stage:
    st = stage.copy("verify")
    schedule = []
    for n in st.gm.graph.nodes:
        if n.meta.get("boundary") is not None:
            raise VerifyError(f"boundary marker {n.name} survived localize")
        wants = n.meta.get("wants")
        if wants is not None:
            for a, w in zip(tensor_args(n), wants):
                if a.meta.get("placement") != w:
                    raise VerifyError(f"{n.name} in {n.meta.get('scope')} wants {a.name} as "
                                      f"{w}, but it is {a.meta.get('placement')}")
        c = n.meta.get("collective")
        if c is None:
            continue
        if n.meta.get("region") is not None:
            raise VerifyError(f"collective {n.name} inside annotated module "
                              f"{n.meta['region'][0]}")
        m = _LAYER.match(n.meta.get("scope", ""))
        schedule.append({"node": n.name, "kind": c["kind"], "from": c["from"], "to": c["to"],
                         "layer": int(m.group(1)) if m else None,
                         "scope": n.meta.get("scope", ""), "value": c["value"],
                         "shape": fmt_val(n.meta.get("val"))})
    # Against propagation's own record, not insert_collectives' tags: a pass that drops a
    # collective and rewrites its consumer's `wants` to match passes the edge check above.
    asked = Counter(stage.facts["redistributions"])
    done = Counter((c["value"], c["from"], c["to"]) for c in schedule)
    if asked != done:
        missing = sorted((asked - done).elements())
        extra = sorted((done - asked).elements())
        raise VerifyError(f"the collectives differ from the redistributions propagation asked "
                          f"for: missing {missing}, not asked for {extra} ((value, from, to))")
    st.facts["schedule"] = schedule
    return st
