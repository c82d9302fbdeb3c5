"""`--patch_offset_weights`: the weights of the K targets of the patch stage's loss, from a named rule or a list.

The paper (Eq. 3) averages the K next-patch targets equally. Token Superposition Training (Nous Research, 2026)
weights them unequally for large K with a power law over the offsets; its exponent and exact form are not
given here (see docs/recipes.md), so the rule is a parameter:

- `power:<alpha>`: w_k proportional to k^-alpha, k = 1..K (alpha >= 0; alpha = 0 is the paper's mean);
- a JSON list of K non-negative numbers, e.g. `[1, 0.5, 0.25, 0.125]`.

Either is scaled to mean 1 (`loss.normalise_offset_weights`), so equal weights are Eq. 3 exactly.
"""

from __future__ import annotations

import json
import math

from .loss import normalise_offset_weights

from .cli import UsageError

FLAG = "--patch_offset_weights"


def parse_offset_weights(spec: str | list | None, patch_size: int) -> tuple[float, ...] | None:
    """The K normalised weights (mean 1) of `spec`, or None for the paper's plain mean (no spec, or equal weights).

    `spec`: "power:<alpha>", a JSON list string, a list (from a JSON config file), or None. Raises UsageError
    (one line) for K = 1, an unknown rule, a bad exponent, a list that is not K numbers, negative, non-finite or
    all-zero weights."""
    if spec is None:
        return None
    if patch_size < 2:
        raise UsageError(f"{FLAG} {spec} needs --patch_size K > 1: with K = 1 there is one target to weight")
    if isinstance(spec, str) and spec.strip().startswith("power:"):
        text = spec.strip().removeprefix("power:")
        try:
            alpha = float(text)
        except ValueError:
            raise UsageError(f"{FLAG} {spec}: the exponent {text!r} is not a number (power:<alpha>, e.g. power:1)") from None
        if not math.isfinite(alpha) or alpha < 0:
            raise UsageError(f"{FLAG} {spec}: power:<alpha> needs a finite alpha >= 0 (w_k ~ k^-alpha), got {alpha}")
        values = [k**-alpha for k in range(1, patch_size + 1)]
    else:
        values = spec
        if isinstance(spec, str):
            try:
                values = json.loads(spec)
            except ValueError:
                values = None
        if not isinstance(values, list):
            raise UsageError(f"{FLAG} {spec}: give power:<alpha> (w_k ~ k^-alpha) or a JSON list of K={patch_size} weights")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise UsageError(f"{FLAG} {spec}: the list must hold numbers")
        if len(values) != patch_size:
            raise UsageError(f"{FLAG} {spec}: {len(values)} weights for K={patch_size} offsets")
    try:
        return normalise_offset_weights(values)
    except ValueError as error:
        raise UsageError(f"{FLAG} {spec}: {error}") from None
