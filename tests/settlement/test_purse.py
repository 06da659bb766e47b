"""The purse's holds without a chain: a stand-in escrow, whose readings the test sets."""

import asyncio

import pytest

from odla.core.config import Price
from odla.serving.jobs import Job
from odla.settlement.chain import Standing
from odla.settlement.ledger import Charge
from odla.settlement.prices import Prices
from odla.settlement.purse import PaymentRequired, Purse

CLIENT, NODE = "0x" + "aA" * 20, "0x" + "bb" * 20
PRICES = Prices({"llama3": Price(prompt=1_000_000, output=1_000_000)})  # a wei a token


class Escrow:
    chain_id, address = 31337, "0x" + "cc" * 20

    def __init__(self, deposited: int) -> None:
        self.deposited = deposited

    def standing(self, account: str) -> Standing:
        return Standing(self.deposited, 0, 0, 0)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def purse(deposited: int, signed_off: int) -> tuple[Purse, Clock]:
    clock = Clock()
    found = Purse(PRICES, Escrow(deposited), max_job_tokens=100, poll_s=10, clock=clock)  # type: ignore[arg-type]
    found.open({}, {CLIENT: (signed_off, "0x")})
    return found, clock


def job(model: str = "llama3:latest") -> Job:
    return Job(door="ollama", model=model, caller=CLIENT, node_address=NODE)


def test_holds_cover_running_jobs_and_release_to_what_they_cost():
    async def run() -> None:
        wallet, _ = purse(deposited=250, signed_off=1000)
        first, second, third = job(), job(), job()
        await wallet.hold(first, "llama3", 10, None)  # 10 + 100 (max_job_tokens)
        await wallet.hold(second, "llama3", 10, 90)
        with pytest.raises(PaymentRequired, match="has 40 available"):
            await wallet.hold(third, "llama3", 10, 90)  # would overdraw: two running jobs hold 210
        first.delivered, first.usage.prompt_tokens = 5, 10
        wallet.ended(first)  # now held at what it cost: 15
        await wallet.hold(third, "llama3", 10, 90)
        assert wallet.held[CLIENT] == 15 + 100 + 100
        first.charge = Charge(first.id, CLIENT, NODE, NODE, 15, 0, 10, 5)
        first.outcome = "ok"
        wallet.charged(first)
        assert wallet.spent[CLIENT] == 15 and wallet.held[CLIENT] == 200
    asyncio.run(run())


def test_a_resumed_jobs_hold_is_split_among_its_nodes_and_each_let_go_with_its_receipt():
    async def run() -> None:
        wallet, _ = purse(deposited=1000, signed_off=1000)
        resumed = job()
        await wallet.hold(resumed, "llama3", 10, 90)  # 100
        resumed.usage.prompt_tokens, resumed.delivered, resumed.legs = 10, 12, [("n1", 3), ("n2", 9)]
        part = Job(door="ollama", model="llama3:latest", caller=CLIENT, id=f"{resumed.id}.1", node="n2",
                   node_address=NODE, part_of=resumed.id, delivered=9)
        resumed.parts.append(part)
        wallet.ended(resumed)  # the first node: the prompt and its 3 tokens; the second: its 9 tokens only
        assert wallet.holds[resumed.id][1] == 13 and wallet.holds[part.id][1] == 9 and wallet.held[CLIENT] == 22
        part.charge, part.outcome = Charge(part.id, CLIENT, NODE, NODE, 9, 0, 0, 9), "ok"
        wallet.charged(part)
        assert wallet.spent[CLIENT] == 9 and wallet.held[CLIENT] == 13 and part.id not in wallet.holds
    asyncio.run(run())


def test_the_voucher_caps_spending_below_the_deposit_and_a_free_or_expired_job_releases_nothing():
    async def run() -> None:
        wallet, clock = purse(deposited=10_000, signed_off=50)
        with pytest.raises(PaymentRequired, match="signed off 50"):
            await wallet.hold(job(), "llama3", 10, 90)
        free = job(model="mistral:latest")
        await wallet.hold(free, "mistral", 10, 90)  # no price: no hold
        free.outcome = "ok"
        wallet.ended(free)
        wallet.charged(free)  # its receipt: nothing to let go
        small = job()
        await wallet.hold(small, "llama3", 10, 20)
        small.outcome, small.delivered = "ok", 20
        wallet.ended(small)
        clock.now += 601  # its receipt never came
        await wallet.hold(job(), "llama3", 10, 20)  # the expired hold is gone
        wallet.charged(small)  # a receipt after all: its hold had expired already
    asyncio.run(run())


def test_readings_of_the_chain_are_one_a_second_at_most_however_many_ask():
    async def run() -> None:
        wallet, clock = purse(deposited=100, signed_off=1000)
        reads = []
        standing = wallet.escrow.standing
        wallet.escrow.standing = lambda account: reads.append(account) or standing(account)  # type: ignore[method-assign]
        for _ in range(50):
            await wallet.standing(CLIENT)  # GET /accounts/{account}
            with pytest.raises(PaymentRequired):
                await wallet.hold(job(), "llama3", 10, 200)  # refused, on a fresh reading
        assert len(reads) == 1
        clock.now += 1.5
        await wallet.standing(CLIENT)
        assert len(reads) == 2
    asyncio.run(run())
