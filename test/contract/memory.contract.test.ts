import { describeBackendContract } from '../../testing/index.js';
import { memoryModule } from '../support/memory-backend.js';

describeBackendContract({
  name: 'memory (test backend)',
  setup: async () => ({ plugins: [memoryModule], backend: { name: 'mem', kind: 'memory' } }),
});

describeBackendContract({
  name: 'memory with only volume capabilities',
  setup: async () => ({
    plugins: [memoryModule],
    backend: { name: 'memlite', kind: 'memory', capabilities: ['volume.create', 'volume.delete', 'volume.list', 'volume.resize'] },
  }),
});
