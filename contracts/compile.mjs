// Compile the escrow with solc-js (standard JSON) and write what the Python side deploys and calls:
// ../odla/settlement/OdlaEscrow.json (the escrow's ABI and bytecode, and an ERC-20's ABI), and the
// tests' token ../tests/settlement/TestToken.json. `node compile.mjs --check` exits 1 when either
// file is not what these sources compile to.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const solc = require("solc");
const here = path.dirname(fileURLToPath(import.meta.url));
const IERC20 = "@openzeppelin/contracts/token/ERC20/IERC20.sol";

const settings = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun", // what Arbitrum One and Sepolia run
};
const input = {
  language: "Solidity",
  sources: {
    "OdlaEscrow.sol": { content: fs.readFileSync(path.join(here, "OdlaEscrow.sol"), "utf8") },
    "test/TestToken.sol": { content: fs.readFileSync(path.join(here, "test", "TestToken.sol"), "utf8") },
  },
  settings: {
    ...settings,
    outputSelection: {
      "OdlaEscrow.sol": { OdlaEscrow: ["abi", "evm.bytecode.object"] },
      "test/TestToken.sol": { TestToken: ["abi", "evm.bytecode.object"] },
      [IERC20]: { IERC20: ["abi"] },
    },
  },
};

function findImports(name) {
  const file = path.join(here, "node_modules", name);
  return fs.existsSync(file) ? { contents: fs.readFileSync(file, "utf8") } : { error: `not found: ${name}` };
}

const result = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
for (const e of result.errors || []) console.error(e.formattedMessage);
if ((result.errors || []).some((e) => e.severity === "error")) process.exit(2);

const made = (source, name) => result.contracts[source][name];
const artifact = (name, contract, extra = {}) => JSON.stringify({
  contractName: name,
  compiler: `solc-js ${solc.version()}`,
  settings,
  abi: contract.abi,
  bytecode: "0x" + contract.evm.bytecode.object,
  ...extra,
}, null, 1) + "\n";
const outputs = {
  [path.join(here, "..", "odla", "settlement", "OdlaEscrow.json")]:
    artifact("OdlaEscrow", made("OdlaEscrow.sol", "OdlaEscrow"), { erc20Abi: made(IERC20, "IERC20").abi }),
  [path.join(here, "..", "tests", "settlement", "TestToken.json")]:
    artifact("TestToken", made("test/TestToken.sol", "TestToken")),
};
if (process.argv.includes("--check")) {
  const stale = Object.entries(outputs).filter(([file, text]) => !fs.existsSync(file) || fs.readFileSync(file, "utf8") !== text);
  for (const [file] of stale) console.log(`${path.basename(file)} is stale: run make contracts`);
  if (!stale.length) console.log("the compiled contracts are up to date");
  process.exit(stale.length ? 1 : 0);
}
for (const [file, text] of Object.entries(outputs)) {
  fs.writeFileSync(file, text);
  console.log(`wrote ${file}`);
}
