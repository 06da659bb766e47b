// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @notice An ERC-20 for the tests only: anyone can mint. Never deployed but on a local chain.
contract TestToken is ERC20 {
    constructor() ERC20("ODLA Test Token", "OTT") {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }
}
