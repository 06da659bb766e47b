// Compile OdlaEscrow.sol with solc-js (standard JSON) and write the ABI and bytecode the Python
// side deploys: ../odla/settlement/OdlaEscrow.json. `node compile.mjs --check` exits 1 when that
// file is not what this source compiles to.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const solc = require("solc");
const here = path.dirname(fileURLToPath(import.meta.url));
const out = path.join(here, "..", "odla", "settlement", "OdlaEscrow.json");

const input = {
  language: "Solidity",
  sources: { "OdlaEscrow.sol": { content: fs.readFileSync(path.join(here, "OdlaEscrow.sol"), "utf8") } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun", // what Arbitrum One and Sepolia run
    outputSelection: { "OdlaEscrow.sol": { OdlaEscrow: ["abi", "evm.bytecode.object"] } },
  },
};

function findImports(name) {
  const file = path.join(here, "node_modules", name);
  return fs.existsSync(file) ? { contents: fs.readFileSync(file, "utf8") } : { error: `not found: ${name}` };
}

const result = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
const errors = (result.errors || []).filter((e) => e.severity === "error");
for (const e of result.errors || []) console.error(e.formattedMessage);
if (errors.length) process.exit(2);
const contract = result.contracts["OdlaEscrow.sol"].OdlaEscrow;
const artifact = JSON.stringify({
  contractName: "OdlaEscrow",
  compiler: `solc-js ${solc.version()}`,
  settings: input.settings,
  abi: contract.abi,
  bytecode: "0x" + contract.evm.bytecode.object,
}, null, 1) + "\n";
if (process.argv.includes("--check")) {
  const same = fs.existsSync(out) && fs.readFileSync(out, "utf8") === artifact;
  console.log(same ? "OdlaEscrow.json is up to date" : "OdlaEscrow.json is stale: run make contracts");
  process.exit(same ? 0 : 1);
}
fs.writeFileSync(out, artifact);
console.log(`wrote ${out}`);
