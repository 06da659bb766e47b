"""What work costs: per model, per million prompt tokens and per million output tokens, in the
settlement unit's smallest denomination (wei for a chain's native currency). Integers only.

    prices = Prices(settings.prices, settings.operator_fee_bps)
    prices.cost("llama3", prompt_tokens=12, output_tokens=300)   # -> int, rounded down
    prices.split(cost)                                           # -> (to the node, the operator's fee)

A model without a price costs what ``"*"`` says, or nothing. Rounding is per job and always
down: a job never costs the client more than its exact price.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from odla.core.names import model_key

PER = 1_000_000
"Prices are per this many tokens."
BPS = 10_000
"A fee in basis points: 100 is 1 %."


class Prices:
    def __init__(self, prices: Mapping[str, Any], fee_bps: int = 0) -> None:
        self.table: dict[str, tuple[int, int]] = {}
        self.default: Optional[tuple[int, int]] = None
        for name, price in prices.items():
            pair = (int(price.prompt), int(price.output))
            if name == "*":
                self.default = pair
            else:
                self.table[model_key(name)] = pair
        self.fee_bps = fee_bps

    def __bool__(self) -> bool:
        return bool(self.table) or self.default is not None

    def of(self, model: str) -> Optional[tuple[int, int]]:
        """(per million prompt tokens, per million output tokens), or None: free."""
        return self.table.get(model_key(model), self.default)

    def cost(self, model: str, prompt_tokens: int, output_tokens: int) -> int:
        price = self.of(model)
        if price is None:
            return 0
        return (max(prompt_tokens, 0) * price[0] + max(output_tokens, 0) * price[1]) // PER

    def split(self, cost: int) -> tuple[int, int]:
        """``cost`` as (what the node earns, the operator's fee): the fee is rounded down."""
        fee = cost * self.fee_bps // BPS
        return cost - fee, fee

    def row(self, model: str) -> Optional[dict[str, int]]:
        """A model's price as listings show it, or None when it is free."""
        price = self.of(model)
        return {"prompt": price[0], "output": price[1], "per_tokens": PER} if price is not None else None

    def listing(self) -> dict[str, Any]:
        """``GET /prices``."""
        models = {name: {"prompt": p, "output": o} for name, (p, o) in sorted(self.table.items())}
        if self.default is not None:
            models["*"] = {"prompt": self.default[0], "output": self.default[1]}
        return {"per_tokens": PER, "operator_fee_bps": self.fee_bps, "models": models}
