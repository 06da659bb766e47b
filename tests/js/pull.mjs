// ollama-js's pull, pointed at an ODLA operator: node pull.mjs URL MODEL REPLICAS
// Prints each progress object as a JSON line, as the library hands it to an application.
import { Ollama } from 'ollama'

const [host, model, replicas] = process.argv.slice(2)
const client = new Ollama({ host, headers: { 'X-ODLA-Replicas': replicas } })
try {
  for await (const part of await client.pull({ model, stream: true })) {
    console.log(JSON.stringify(part))
  }
} catch (error) {
  console.log(JSON.stringify({ error: String(error.message || error) }))
  process.exitCode = 1
}
