// Parse AsyncAPI documents with the official parser (@asyncapi/parser) and print its
// diagnostics as one JSON object: {"files": {PATH: {"errors": [...], "warnings": [...]}}}.
// Usage: node validate.mjs FILE...   Exit status 1 when any document has an error.
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const SEVERITY = ["error", "warning", "info", "hint"];
const parser = new Parser();
const files = {};
let failed = false;

for (const path of process.argv.slice(2)) {
  const { document, diagnostics } = await parser.parse(await readFile(path, "utf8"), { source: path });
  const out = { errors: [], warnings: [], parsed: document !== undefined };
  for (const d of diagnostics) {
    const item = { code: String(d.code), message: d.message, path: d.path.join("/") };
    if (d.severity === 0) out.errors.push(item);
    else if (d.severity === 1) out.warnings.push(item);
    else (out[SEVERITY[d.severity]] ??= []).push(item);
  }
  if (out.errors.length || !out.parsed) failed = true;
  files[path] = out;
}
console.log(JSON.stringify({ files }));
process.exit(failed ? 1 : 0);
