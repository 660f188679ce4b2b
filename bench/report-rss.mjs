// Preload for benchmarks: on exit, write this process's peak RSS (KiB) to $OFFLOAD_RSS_OUT.
import { writeFileSync } from 'node:fs';

process.on('exit', () => {
  if (process.env.OFFLOAD_RSS_OUT) writeFileSync(process.env.OFFLOAD_RSS_OUT, String(process.resourceUsage().maxRSS));
});
