/**
 * The files of the user project that test/package/package.test.ts installs the packed tarball
 * into: a tiny out-of-tree plugin (volumes in memory, bound through a ContainerModule, importing
 * only the published entry points), its TypeScript config and the broker config the README's API
 * example reads. The contract test file and the example themselves come from the README.
 */

/** src/my-plugin.ts: what the README's "Writing a backend plugin" snippet imports (`myModule`, kind `mine`). */
export const MY_PLUGIN = `
import { ContainerModule } from 'inversify';
import { z } from 'zod';
import {
  AlreadyExists, BackendFactory, CapabilitySet, InvalidArgument, NotFound, OutOfRange, Unsupported,
  type CreateVolumeRequest, type Page, type PageRequest, type StorageBackend, type Volume,
} from 'offload-broker';

/** Volumes only, kept in memory: the smallest backend the contract suite accepts. */
class MyBackend implements StorageBackend {
  readonly kind = 'mine';
  private readonly sizes = new Map<string, number>();

  constructor(readonly name: string) {}

  async capabilities(): Promise<CapabilitySet> {
    return CapabilitySet.of('volume.create', 'volume.delete', 'volume.resize', 'volume.list');
  }

  async createVolume(req: CreateVolumeRequest): Promise<Volume> {
    if (req.source) throw new Unsupported('mine cannot clone');
    const size = checkSize(req.sizeBytes);
    const have = this.sizes.get(req.name);
    if (have !== undefined && have !== size) throw new AlreadyExists(\`\${req.name} exists with \${have} bytes\`);
    this.sizes.set(req.name, size);
    return this.view(req.name);
  }

  async getVolume(name: string): Promise<Volume | undefined> {
    return this.sizes.has(name) ? this.view(name) : undefined;
  }

  /** The token is the last name of the page (names are [A-Za-z0-9._-]). */
  async listVolumes(page: PageRequest = {}): Promise<Page<Volume>> {
    const after = page.token;
    if (after !== undefined && !/^[\\w][\\w.-]*$/.test(after)) throw new InvalidArgument(\`invalid page token "\${after}"\`);
    const rest = [...this.sizes.keys()].sort().filter((n) => after === undefined || n > after);
    const items = rest.slice(0, Math.min(page.limit ?? 100, 100)).map((n) => this.view(n));
    return items.length < rest.length ? { items, next: items[items.length - 1]!.name } : { items };
  }

  async resizeVolume(name: string, sizeBytes: number): Promise<Volume> {
    const size = checkSize(sizeBytes);
    const have = this.sizes.get(name);
    if (have === undefined) throw new NotFound(\`\${name} does not exist\`);
    if (size < have) throw new OutOfRange(\`\${name} cannot shrink\`);
    this.sizes.set(name, size);
    return this.view(name);
  }

  async deleteVolume(name: string): Promise<void> {
    this.sizes.delete(name);
  }

  async createSnapshot(): Promise<never> { throw new Unsupported('mine has no snapshots'); }
  async listSnapshots(): Promise<never> { throw new Unsupported('mine has no snapshots'); }
  async deleteSnapshot(): Promise<never> { throw new Unsupported('mine has no snapshots'); }
  async revertVolume(): Promise<never> { throw new Unsupported('mine has no snapshots'); }

  private view(name: string): Volume {
    return { backend: this.name, name, sizeBytes: this.sizes.get(name)! };
  }
}

function checkSize(size: unknown): number {
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0) {
    throw new InvalidArgument(\`a size is a positive whole number of bytes, got \${String(size)}\`);
  }
  return size;
}

const myFactory: BackendFactory = {
  kind: 'mine',
  description: 'volumes in memory (an out-of-tree example)',
  configSchema: z.strictObject({ name: z.string(), kind: z.literal('mine') }),
  async create(config) {
    return new MyBackend(config.name);
  },
};

export const myModule = new ContainerModule(({ bind }) => {
  bind(BackendFactory).toConstantValue(myFactory);
});
`;

/** tsconfig.json: strict, NodeNext, checking the shipped declarations too (no skipLibCheck). */
export const TSCONFIG = JSON.stringify({
  compilerOptions: {
    target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, noEmit: true,
    types: ['node'], skipLibCheck: false,
  },
  include: ['example.ts', 'src', 'test'],
}, null, 2);

/**
 * offload.yaml: the README's configuration (local pool, san1, nas1), with the mock appliances'
 * endpoints and secrets from the environment.
 */
export const CONFIG = `state: ./.offload
backends:
  - name: local
    kind: qcow2
    path: ./pool
  - name: san1
    kind: flasharray
    endpoint: \${SAN_URL}
    apiToken: \${SAN_TOKEN}
  - name: nas1
    kind: ontap
    endpoint: \${NAS_URL}
    username: admin
    password: \${NAS_PASSWORD}
    svm: svm0
`;
