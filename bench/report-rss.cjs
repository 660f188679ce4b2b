// Preload for benchmarks (`node --require`): on exit, write this process's peak RSS (KiB) to
// $OFFLOAD_RSS_OUT. CommonJS: an `--import` preload would start Node's ES module loader, which
// `offload img` does not otherwise load.
const { writeFileSync } = require('node:fs');

process.on('exit', () => {
  if (process.env.OFFLOAD_RSS_OUT) writeFileSync(process.env.OFFLOAD_RSS_OUT, String(process.resourceUsage().maxRSS));
});
