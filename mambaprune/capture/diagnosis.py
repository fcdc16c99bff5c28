"""What to tell a user whose model has no selective scan the compiler can see."""
from __future__ import annotations

import torch


def no_scan_message(model: torch.nn.Module, recognised: list = ()) -> str:
    """Why no scan was found; `recognised`: the capture's behaviour.Recognitions (those not routed are named)."""
    left_alone = [str(r) for r in recognised
                  if not r.verdict.agrees and (r.verdict.error is not None or r.verdict.difference is not None)]
    message = _no_scan_message(model)
    return message + (" Callables probed as scans: " + "; ".join(left_alone[:3]) + "." if left_alone else "")


def _no_scan_message(model: torch.nn.Module) -> str:
    suspects = ssm_like_modules(model)
    if suspects:
        names = ", ".join(suspects[:5])
        return (f"no selective scan was found in the captured graph, but {names} hold(s) SSM parameters "
                "(A_log / D). Its scan is probably hand-written (a library mambaprune does not know, or a Python loop "
                "that is not h = exp(delta * A) * h + delta * B * u read out with C over every token from a zero "
                "state, with A per channel or one per head as in Mamba-2, which would be lifted into one scan): declare it with mambaprune.register_scan(your_scan_fn, adapter), where the adapter "
                "computes the same thing with mambaprune.selective_scan. If the mixer is no recurrence at all (a "
                "non-causal state-space duality or linear attention summing over every token, as VSSD's NC-SSD), "
                "there is no scan to prune: mambaprune prunes recurrent scans only.")
    return ("no selective scan was found: mambaprune looked for mambaprune::selective_scan nodes after routing "
            "mamba_ssm (selective_scan_fn, mamba_inner_fn, bimamba_inner_fn ...), mambapy and register_scan "
            "entry points, and for modules with A_log/D parameters. Is this a state-space model? If it is, "
            "declare its scan with mambaprune.register_scan.")


def ssm_like_modules(model: torch.nn.Module) -> list:
    """Modules holding SSM parameters: an A (or A_log, A_b_log) and a D."""
    found = []
    for name, module in model.named_modules():
        params = {p for p, _ in module.named_parameters(recurse=False)}
        if any(p.startswith("A_log") or p == "A" or p.startswith("A_b_log") for p in params) and \
                any(p.startswith("D") for p in params):
            found.append(name or type(module).__name__)
    return found
