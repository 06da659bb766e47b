// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {Address} from "@openzeppelin/contracts/utils/Address.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

/// @title ODLA's escrow: clients deposit, the operator posts each epoch's settlement, nodes claim.
/// @notice Amounts are in the settlement unit's smallest denomination: wei of the chain's native
/// currency, or of the ERC-20 `token` when one was given at deployment. Every figure the operator posts is cumulative, so a replayed or
/// repeated post or claim moves nothing: a payee is paid `owed - claimed`, a client is charged
/// `charged - alreadyCharged`.
/// - Clients `deposit`, and sign off what the operator may charge them in all: an EIP-712
///   `Spend(client, cumulative)` voucher, which the operator keeps.
/// - At each epoch the operator `post`s what each client has been charged in all (never more than
///   it deposited, nor than a voucher it signed, never less than before) and the Merkle root of what each
///   payee (node or operator) is owed in all; leaves are
///   keccak256(bytes.concat(keccak256(abi.encode(payee, owed)))), pairs sorted (OpenZeppelin).
/// - Payees `claim` with a proof; claims never pay out more than clients were charged.
/// - Clients `requestWithdrawal`, then `withdraw` what was not charged, after `withdrawDelay`
///   (time for the operator to post what they spent until then).
contract OdlaEscrow is ReentrancyGuard, EIP712 {
    using SafeERC20 for IERC20;

    bytes32 public constant SPEND_TYPEHASH = keccak256("Spend(address client,uint256 cumulative)");

    address public immutable operator;
    /// @notice The ERC-20 clients pay in; address(0): the chain's native currency.
    IERC20 public immutable token;
    uint256 public immutable withdrawDelay;

    uint64 public epoch;
    bytes32 public root;
    uint256 public totalCharged;
    uint256 public totalClaimed;
    mapping(address => uint256) public deposited;
    mapping(address => uint256) public charged;
    mapping(address => uint256) public claimed;
    mapping(address => uint256) public withdrawableAt;

    event Deposited(address indexed client, uint256 amount, uint256 deposited);
    event Charged(address indexed client, uint256 charged);
    event Posted(uint64 indexed epoch, bytes32 root, uint256 totalCharged);
    event Claimed(address indexed payee, uint256 amount, uint256 owed);
    event WithdrawalRequested(address indexed client, uint256 withdrawableAt);
    event Withdrawn(address indexed client, uint256 amount);

    error NotOperator();
    error EmptyDeposit();
    error StaleEpoch(uint64 latest);
    error LengthMismatch();
    error ChargeDecreased(address client, uint256 charged);
    error Overdrawn(address client, uint256 charge, uint256 deposited);
    error BadProof();
    error NothingToClaim(uint256 claimed);
    error Unfunded(uint256 available);
    error NothingToWithdraw();
    error NoWithdrawalRequested();
    error TooEarly(uint256 withdrawableAt);
    error WrongCurrency();
    error NotSignedOff(address client, uint256 charge, uint256 signedOff);

    constructor(address operator_, uint256 withdrawDelay_, address token_) EIP712("ODLA Escrow", "1") {
        operator = operator_;
        withdrawDelay = withdrawDelay_;
        token = IERC20(token_);
    }

    /// @notice Deposit `amount`: sent with the call in the native currency, or taken from the
    /// caller's ERC-20 allowance (what arrives is what counts, whatever the token charges).
    function deposit(uint256 amount) external payable nonReentrant {
        uint256 received;
        if (address(token) == address(0)) {
            if (msg.value != amount) revert WrongCurrency();
            received = amount;
        } else {
            if (msg.value != 0) revert WrongCurrency();
            uint256 before = token.balanceOf(address(this));
            token.safeTransferFrom(msg.sender, address(this), amount);
            received = token.balanceOf(address(this)) - before;
        }
        if (received == 0) revert EmptyDeposit();
        deposited[msg.sender] += received;
        emit Deposited(msg.sender, received, deposited[msg.sender]);
    }

    /// @notice Epoch `epoch_`'s settlement: each listed client's cumulative charge, with the
    /// voucher (`signedOff`, `signatures`) by which the client allowed at least that much, and the
    /// root of every payee's cumulative earnings. Only the operator; epochs only go up.
    function post(uint64 epoch_, bytes32 root_, address[] calldata clients, uint256[] calldata charges,
                  uint256[] calldata signedOff, bytes[] calldata signatures) external {
        if (msg.sender != operator) revert NotOperator();
        if (epoch_ <= epoch) revert StaleEpoch(epoch);
        if (clients.length != charges.length || clients.length != signedOff.length || clients.length != signatures.length) {
            revert LengthMismatch();
        }
        uint256 total = totalCharged;
        for (uint256 i = 0; i < clients.length; i++) {
            address client = clients[i];
            uint256 before = charged[client];
            if (charges[i] < before) revert ChargeDecreased(client, before);
            if (charges[i] > deposited[client]) revert Overdrawn(client, charges[i], deposited[client]);
            if (charges[i] != before) {
                bytes32 digest = _hashTypedDataV4(keccak256(abi.encode(SPEND_TYPEHASH, client, signedOff[i])));
                (address signer, ECDSA.RecoverError failed,) = ECDSA.tryRecover(digest, signatures[i]);
                if (charges[i] > signedOff[i] || failed != ECDSA.RecoverError.NoError || signer != client) {
                    revert NotSignedOff(client, charges[i], signedOff[i]);
                }
                charged[client] = charges[i];
                total += charges[i] - before;
                emit Charged(client, charges[i]);
            }
        }
        totalCharged = total;
        epoch = epoch_;
        root = root_;
        emit Posted(epoch_, root_, total);
    }

    /// @notice Pay the caller what it is owed in all (`owed`, proven in the latest root) less what
    /// it was paid before.
    function claim(uint256 owed, bytes32[] calldata proof) external nonReentrant {
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(msg.sender, owed))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) revert BadProof();
        uint256 before = claimed[msg.sender];
        if (owed <= before) revert NothingToClaim(before);
        uint256 amount = owed - before;
        if (totalClaimed + amount > totalCharged) revert Unfunded(totalCharged - totalClaimed);
        claimed[msg.sender] = owed;
        totalClaimed += amount;
        emit Claimed(msg.sender, amount, owed);
        _pay(msg.sender, amount);
    }

    function available(address client) external view returns (uint256) {
        return deposited[client] - charged[client];
    }

    /// @notice An account in one call: what it deposited, was charged, claimed, and when it may withdraw.
    function standing(address account) external view returns (uint256, uint256, uint256, uint256) {
        return (deposited[account], charged[account], claimed[account], withdrawableAt[account]);
    }

    function requestWithdrawal() external {
        if (deposited[msg.sender] <= charged[msg.sender]) revert NothingToWithdraw();
        withdrawableAt[msg.sender] = block.timestamp + withdrawDelay;
        emit WithdrawalRequested(msg.sender, withdrawableAt[msg.sender]);
    }

    /// @notice After the delay, what the caller deposited and was not charged.
    function withdraw() external nonReentrant {
        uint256 at = withdrawableAt[msg.sender];
        if (at == 0) revert NoWithdrawalRequested();
        if (block.timestamp < at) revert TooEarly(at);
        uint256 amount = deposited[msg.sender] - charged[msg.sender];
        if (amount == 0) revert NothingToWithdraw();
        deposited[msg.sender] = charged[msg.sender];
        withdrawableAt[msg.sender] = 0;
        emit Withdrawn(msg.sender, amount);
        _pay(msg.sender, amount);
    }

    function _pay(address to, uint256 amount) private {
        if (address(token) == address(0)) {
            Address.sendValue(payable(to), amount);
        } else {
            token.safeTransfer(to, amount);
        }
    }
}
