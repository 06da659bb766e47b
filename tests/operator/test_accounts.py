"""The operator's routes for paying for work, over HTTP: sign-in's refusals and their status codes,
a token working as an API key does (and no longer after logout), claims' bad input (issue 27)."""

import dataclasses
import time

import httpx
from eth_account import Account
from eth_account.messages import encode_defunct

from odla.settlement.signin import SignIn

WALLET = Account.from_key("0x" + "55" * 32)


def signed_in(url: str, **change) -> httpx.Response:
    signin = SignIn.to(url, WALLET.address, httpx.get(f"{url}/auth/nonce").json(), time.time())
    text = dataclasses.replace(signin, **change).text()
    signature = WALLET.sign_message(encode_defunct(text=text)).signature.hex()
    return httpx.post(f"{url}/auth/verify", json={"message": text, "signature": "0x" + signature.removeprefix("0x")})


def test_a_wallet_token_works_where_an_api_key_does_until_logout(operator):
    op = operator(api_keys=["k1"], wallet_signin=True)
    assert httpx.get(f"{op.url}/nodes").status_code == 401
    answer = signed_in(op.url)
    assert answer.status_code == 200 and answer.json()["account"] == WALLET.address
    auth = {"authorization": f"Bearer {answer.json()['token']}"}
    assert httpx.get(f"{op.url}/nodes", headers=auth).status_code == 200
    assert httpx.get(f"{op.url}/accounts/me", headers=auth).json()["account"] == WALLET.address
    assert httpx.post(f"{op.url}/auth/logout", headers=auth).json() == {"signed_out": True}
    refused = httpx.get(f"{op.url}/nodes", headers=auth)
    assert refused.status_code == 401 and "login" in refused.json()["error"]


def test_sign_in_refusals_have_their_status_and_reason(operator):
    op = operator(chain_id=31337)
    assert signed_in(op.url, domain="evil.example").status_code == 401
    assert "chain 1" in signed_in(op.url, chain_id=1).json()["error"]
    assert "expired" in signed_in(op.url, expiration_time="2020-01-01T00:00:00Z").json()["error"]
    for body in ({"message": "hello", "signature": "0x00"}, {"message": 5}, {}):
        assert httpx.post(f"{op.url}/auth/verify", json=body).status_code == 422, body
    assert httpx.post(f"{op.url}/auth/verify", content=b"{not json").status_code in (400, 422)


def test_claims_and_accounts_refuse_bad_input(operator):
    op = operator()
    assert httpx.get(f"{op.url}/settlement/claims/0x1234").status_code == 422
    missing = httpx.get(f"{op.url}/settlement/claims/0x" + "ab" * 20)
    assert missing.status_code == 404 and "does not settle on chain" in missing.json()["error"]
    assert httpx.get(f"{op.url}/accounts/0x" + "zz" * 20).status_code == 422
    assert httpx.get(f"{op.url}/accounts/me", params={"limit": 0}).status_code == 422
    assert httpx.get(f"{op.url}/accounts/me").json() == {"account": "anonymous", "balance": 0, "by_role": {},
                                                          "entries": [], "next_before": None}


def test_an_operator_that_keeps_to_its_api_keys_lets_no_wallet_in(operator):
    """With api_keys and no settlement, sign-in is off unless wallet_signin says so: a stranger's
    wallet must not open a private operator."""
    op = operator(api_keys=["k1"])
    refused = httpx.get(f"{op.url}/auth/nonce")
    assert refused.status_code == 403 and "API keys only" in refused.json()["error"]
    assert httpx.post(f"{op.url}/auth/verify", json={"message": "x", "signature": "0x"}).status_code == 403
    forged = {"authorization": "Bearer odla_wallet_" + "x" * 43}
    assert httpx.get(f"{op.url}/nodes", headers=forged).status_code == 401
