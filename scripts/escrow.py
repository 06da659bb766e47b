"""Deploy ODLA's escrow contract (contracts/OdlaEscrow.sol) on the chain config.json names.

    python scripts/escrow.py deploy [--config FILE] [--withdraw-delay SECONDS]

Reads ``chain_rpc_url``, ``chain_id``, ``settlement_token`` (an ERC-20's address; unset: the
chain's native currency) and ``operator_key_file`` (or OPERATOR_PRIVATE_KEY) from the config: the operator's key deploys the contract, pays the gas, and is the only key that can
post settlements to it. Prints the transaction's hash, and last ``escrow_address: 0x…``: put that
in config.json as ``escrow_address``, with ``"settlement": "evm"``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from odla.core.config import ConfigError, load_settings  # noqa: E402
from odla.proofs.identity import Identity, KeyFileError  # noqa: E402
from odla.settlement.chain import CHAINS, ChainError, Escrow  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/escrow.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    deploy = sub.add_parser("deploy", help="deploy the escrow; its address is the last line printed")
    deploy.add_argument("--config", metavar="FILE", help="the config file (default: $ODLA_CONFIG, else config.json)")
    deploy.add_argument("--withdraw-delay", type=int, default=86400, metavar="SECONDS",
                        help="how long a client's withdrawal waits, for the operator to post what it spent "
                             "(default: 86400, a day)")
    args = parser.parse_args(argv)
    env = {**os.environ, "ODLA_CONFIG": args.config} if args.config else None
    try:
        settings = load_settings(env=env, role="operator")
    except ConfigError as exc:
        print(f"escrow: {exc}", file=sys.stderr)
        return 2
    if not settings.chain_rpc_url or not settings.chain_id:
        print("escrow: set chain_rpc_url and chain_id in the config (42161 Arbitrum One, 421614 Arbitrum Sepolia, "
              "31337 a local anvil)", file=sys.stderr)
        return 2
    if args.withdraw_delay < 0:
        print("escrow: --withdraw-delay is a number of seconds, 0 or more", file=sys.stderr)
        return 2
    try:
        operator = Identity.load(settings.operator_key_file, settings.operator_private_key, create=False)
    except KeyFileError as exc:
        print(f"escrow: {exc} (the operator's key deploys the escrow and posts to it; python server.py makes "
              "one on first start)", file=sys.stderr)
        return 2
    escrow = Escrow(settings.chain_rpc_url, settings.chain_id, timeout=30)
    try:
        address, tx = escrow.deploy(operator, operator.address, args.withdraw_delay, settings.settlement_token)
    except ChainError as exc:
        print(f"escrow: {exc}", file=sys.stderr)
        return 1
    print(f"deployed OdlaEscrow on {CHAINS.get(settings.chain_id, f'chain {settings.chain_id}')}, operator "
          f"{operator.address}, settling in {settings.settlement_token or 'the native currency'}, withdrawal delay "
          f"{args.withdraw_delay} s")
    print(tx)
    print(f"escrow_address: {address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
