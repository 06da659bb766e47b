"""Paying for work, the operator's routes (``odla.settlement``):

    GET  /prices                      what each model's tokens cost, and the operator's fee
    GET  /auth/nonce                  a nonce to sign in with a wallet (EIP-4361)
    POST /auth/verify                 {message, signature} -> {token, account, expires_at}
    POST /auth/logout                 forget the bearer token sent
    GET  /accounts/{account}          balance and ledger entries, newest first (``me``: the caller's)
    POST /accounts/me/allowance       {cumulative, signature}: a wallet signs off what it may be charged
    GET  /settlement/claims/{address} what a payee can claim on chain, with its Merkle proof

An account's ledger is its own business: with ``api_keys``, a caller reads only its own (an
admin key, any). A payee's claim is public, as the chain it is posted to.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field, StrictInt

from odla.core.errors import ODLAError
from odla.core.protocol import Address
from odla.proofs.identity import checksum, is_address
from odla.serving.auth import Callers, bearer
from odla.settlement import ledger
from odla.settlement.prices import Prices

class Allowance(BaseModel):
    cumulative: StrictInt = Field(ge=0, lt=2 ** 256)
    "What the wallet allows the operator to charge it in all (not in addition), in the smallest unit."
    signature: str = Field(max_length=200)
    "Its EIP-712 signature of Spend(client, cumulative) for this escrow (``odla.settlement.vouchers``)."


class Verify(BaseModel):
    message: str = Field(max_length=4096)
    signature: str = Field(max_length=200)


def accounts_router(prices: Prices, callers: Callers, auth: Sequence[Any]) -> APIRouter:
    api = APIRouter(tags=["Paying for work"])

    @api.get("/prices", dependencies=auth, summary="What each model's tokens cost")
    async def price_list() -> dict:
        return prices.listing()

    def sessions(request: Request) -> Any:
        if request.app.state.sessions is None:
            raise ODLAError("this operator takes API keys only: wallet sign-in is off (wallet_signin)", 403)
        return request.app.state.sessions

    @api.get("/auth/nonce", summary="A nonce for a wallet's sign-in message (EIP-4361)")
    async def nonce(request: Request) -> dict:
        return sessions(request).nonce()

    @api.post("/auth/verify", summary="Sign in with a wallet: a bearer token that works as an API key does")
    async def verify(body: Verify, request: Request) -> dict:
        return sessions(request).verify(body.message, body.signature, request.headers.get("host", ""))

    @api.post("/auth/logout", summary="Forget this bearer token")
    async def logout(request: Request) -> dict:
        return {"signed_out": sessions(request).forget(bearer(request.headers))}

    @api.get("/accounts/{account}", dependencies=auth, summary="An account's balance and ledger entries")
    async def account(account: str, request: Request, limit: int = Query(50, ge=1, le=1000),
                      before: Optional[int] = Query(None, ge=1, le=2 ** 63 - 1)) -> dict:
        caller = callers(request.headers)
        if account == "me":
            account = ledger.account_of(caller)
        elif account.startswith("0x"):
            if not is_address(account):
                raise ODLAError(f"not an address: {account}", 422)
            account = checksum(account)
        whose = callers.whose(request.headers)
        if whose is not None and account != ledger.account_of(whose):
            raise ODLAError(f"unknown account: {account}", 404)  # another caller's is none of its business
        receipts = request.app.state.receipts
        await receipts.flush()  # the charges of receipts countersigned so far are in
        statement = await receipts.in_db(ledger.statement, account, limit, before)
        purse = request.app.state.purse
        if purse is not None and account.startswith("0x"):
            statement["chain"] = await purse.standing(account)
        return statement

    @api.post("/accounts/me/allowance", dependencies=auth, summary="Sign off what this wallet may be charged in all")
    async def allowance(body: Allowance, request: Request) -> dict:
        purse = request.app.state.purse
        if purse is None:
            raise ODLAError("this operator does not settle on chain (settlement is not \"evm\")", 404)
        caller = callers(request.headers)
        if not caller.startswith("0x"):
            raise ODLAError("sign in with the wallet that signs off (python client.py login)", 403)
        return await purse.allow(caller, body.cumulative, body.signature)

    @api.get("/settlement/claims/{address}", summary="What a node (or the operator) can claim on chain")
    async def claim(request: Request, address: Address) -> dict:
        poster = request.app.state.poster
        if poster is None:
            raise ODLAError("this operator does not settle on chain (settlement is not \"evm\")", 404)
        found = poster.claim(address)
        if found is None:
            raise ODLAError(f"{address} has nothing to claim in the last settlement posted"
                            + ("" if poster.posted else " (none is posted yet: the first is when an epoch closes)"), 404)
        return found

    return api
